{
  # embedding-server for Nix: the package (glibc and fully static musl), a container image holding only the
  # static binary, a NixOS module, and checks. The model files are fixed-output derivations built from the
  # revisions and sha256 pinned in assets/models.json, handed to build.rs through
  # EMBEDDING_SERVER_MODELS_DIR (layout DIR/<model>/<file>), so the build itself needs no network.
  description = "embedding-server: sentence embeddings over HTTP from one self-contained binary";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      manifest = builtins.fromJSON (builtins.readFile ./assets/models.json);
      # The models every build embeds; feature-gated ones need their cargo feature and their pins.
      defaultModels = builtins.filter (m: m.embedded == "default") manifest.models;

      # DIR/<model>/<file>, each file fetched once by its pinned hash at its pinned revision.
      modelsDir = pkgs:
        let
          fetchFile = model: file: pkgs.fetchurl {
            name = "${model.name}-${file.name}";
            url = "https://huggingface.co/${model.hub.repo}/resolve/${model.hub.revision}/${file.name}";
            sha256 = file.sha256;
          };
          links = lib.concatMapStrings (model:
            "mkdir -p $out/${model.name}\n" + lib.concatMapStrings (file:
              "ln -s ${fetchFile model file} $out/${model.name}/${file.name}\n") model.files)
            defaultModels;
        in
        pkgs.runCommand "embedding-server-models" { } links;

      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;

      # Only what the build reads, so editing docs or deploy files does not rebuild.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./build.rs ./assets ./src ];
      };

      package = pkgs: pkgs.rustPlatform.buildRustPackage {
        pname = "embedding-server";
        inherit version src;
        cargoLock.lockFile = ./Cargo.lock;
        EMBEDDING_SERVER_MODELS_DIR = modelsDir pkgs;
        # The sandbox has no writable home; the compressed-blob cache lives in the build directory instead.
        preBuild = ''export EMBEDDING_SERVER_CACHE_DIR="$TMPDIR/model-cache"'';
        # The sandbox holds only the source: the black-box tests (tests/*.rs) and the NomicBERT unit tests
        # read ../shared, so the check phase runs the unit tests that need nothing else. The full suite is
        # `cargo test --release` beside ../shared (.ci/run).
        cargoTestFlags = [ "--lib" ];
        checkFlags = [ "--skip=models::nomic_bert::tests" ];
        meta = {
          description = "Sentence embeddings over HTTP from one self-contained binary";
          license = with lib.licenses; [ mit asl20 ];
          mainProgram = "embedding-server";
          platforms = lib.platforms.linux;
        };
      };

      # The static binary still names store paths in strings (panic locations in vendored sources); they are
      # not needed at run time, so they are rewritten, and the image then holds nothing but the binary.
      staticBinary = pkgs:
        let static = package pkgs.pkgsStatic;
        in pkgs.runCommand "embedding-server-static-${version}"
          {
            nativeBuildInputs = [ pkgs.nukeReferences ];
            allowedReferences = [ ];
            meta = static.meta;
          } ''
          mkdir -p $out/bin
          cp ${static}/bin/embedding-server $out/bin/
          chmod u+w $out/bin/embedding-server
          nuke-refs $out/bin/embedding-server
        '';

      image = pkgs:
        let static = staticBinary pkgs;
        in pkgs.dockerTools.buildLayeredImage {
          name = "embedding-server";
          tag = version;
          contents = [ static ];
          config = {
            Entrypoint = [ "/bin/embedding-server" ];
            Cmd = [ "serve" ];
            User = "65532:65532";
            Env = [ "EMBEDDING_SERVER_HOST=0.0.0.0" "EMBEDDING_SERVER_PORT=5000" ];
            ExposedPorts."5000/tcp" = { };
            Healthcheck = {
              Test = [ "CMD" "/bin/embedding-server" "health" ];
              # Nanoseconds, as the image format wants them.
              Interval = 10000000000;
              Timeout = 6000000000;
              StartPeriod = 30000000000;
              Retries = 3;
            };
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        embedding-server = package pkgs;
        embedding-server-static = staticBinary pkgs;
        container = image pkgs;
        models = modelsDir pkgs;
        default = embedding-server;
      });

      nixosModules.default = import ./deploy/nix/module.nix self;

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.system}.embedding-server;
        static = self.packages.${pkgs.system}.embedding-server-static;
        # A VM boots the module, waits for READY=1 (Type=notify) and asks for an embedding.
        nixos-service = pkgs.testers.runNixOSTest {
          name = "embedding-server-service";
          nodes.machine = { pkgs, ... }: {
            imports = [ self.nixosModules.default ];
            environment.systemPackages = [ pkgs.curl ];
            services.embedding-server.enable = true;
            virtualisation.memorySize = 2048;
          };
          testScript = ''
            machine.wait_for_unit("embedding-server.service")
            machine.succeed("embedding-server health --port 5000")
            out = machine.succeed(
              "curl -sf -H 'Content-Type: application/json' -d '{\"input\":\"hello\"}' http://127.0.0.1:5000/v1/embeddings"
            )
            assert '"embedding"' in out, out
          '';
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
