{
  # Minimal for now: builds the server with cargo. The model files come from a directory handed to build.rs
  # through EMBEDDING_SERVER_MODELS_DIR (layout DIR/<model>/<file>), since a Nix build has no network.
  description = "embedding-server: sentence embeddings over HTTP from one self-contained binary";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      forAll = f: nixpkgs.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (system: f nixpkgs.legacyPackages.${system});
    in {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "embedding-server";
          version = "0.1.0";
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          doCheck = false;
        };
      });
    };
}
