# NixOS module for embedding-server: `services.embedding-server.*`. The unit mirrors
# deploy/systemd/embedding-server.service (Type=notify, watchdog, DynamicUser, the same hardening).
self:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.embedding-server;
  loopbackOnly = builtins.elem cfg.host [ "127.0.0.1" "::1" "localhost" ];
in
{
  options.services.embedding-server = {
    enable = lib.mkEnableOption "embedding-server, sentence embeddings over HTTP";

    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.embedding-server;
      defaultText = lib.literalExpression "embedding-server.packages.\${system}.embedding-server";
      description = "The embedding-server package (its models are compiled in).";
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      description = "Address to listen on; 0.0.0.0 or :: for every interface.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 5000;
      description = "Port to listen on.";
    };

    models = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Models to load; empty loads every embedded model.";
    };

    threads = lib.mkOption {
      type = lib.types.ints.positive;
      default = 16;
      description = "HTTP worker threads.";
    };

    corsAllowOrigin = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "https://app.example";
      description = "Origin browsers may call from (Access-Control-Allow-Origin); null sends no CORS headers.";
    };

    allowedClients = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "10.0.0.0/8" ];
      description = "Client networks allowed besides localhost (IPAddressAllow=); only matters off loopback.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the port in the firewall.";
    };

    environment = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = { EMBEDDING_SERVER_MAX_BATCH_TOKENS = "8192"; };
      description = "More EMBEDDING_SERVER_* variables (see `embedding-server --help`).";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.embedding-server = {
      description = "embedding-server: sentence embeddings over HTTP";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      environment = {
        EMBEDDING_SERVER_HOST = cfg.host;
        EMBEDDING_SERVER_PORT = toString cfg.port;
        EMBEDDING_SERVER_THREADS = toString cfg.threads;
      }
      // lib.optionalAttrs (cfg.models != [ ]) { EMBEDDING_SERVER_MODEL = lib.concatStringsSep "," cfg.models; }
      // lib.optionalAttrs (cfg.corsAllowOrigin != null) { EMBEDDING_SERVER_CORS_ALLOW_ORIGIN = cfg.corsAllowOrigin; }
      // cfg.environment;
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} serve";
        TimeoutStartSec = 30;
        WatchdogSec = 30;
        Restart = "on-failure";
        RestartSec = 2;
        MemoryHigh = "768M";
        MemoryMax = "1G";
        # Fixed at start: 2 x threads + 7, one per model, and up to 2 per core for the engine; see
        # deploy/README.md ("Threads, files and connections"). 224 covers one model on 100 cores.
        TasksMax = 2 * cfg.threads + 224;
        # The default --max-connections is this less 64 + 2 x (threads + 1); setrlimit is filtered below,
        # so the server cannot raise it itself.
        LimitNOFILE = 16384;

        DynamicUser = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = true;
        PrivateIPC = true;
        PrivateMounts = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        UMask = "0077";
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
        SystemCallErrorNumber = "EPERM";
        DevicePolicy = "closed";
        IPAddressDeny = "any";
        IPAddressAllow = [ "localhost" ] ++ lib.optionals (!loopbackOnly) cfg.allowedClients;
      };
    };
  };
}
