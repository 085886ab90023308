//! embedding-server: sentence embeddings over HTTP from one self-contained binary.

use embedding_server::cli::{self, Command};
use embedding_server::{commands, models, server};

/// The static (musl) build swaps musl's allocator, which is slow under many threads, for mimalloc.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let result = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::help());
            Ok(())
        }
        Ok(Command::Version) => {
            println!("embedding-server {}", env!("CARGO_PKG_VERSION"));
            for spec in models::CATALOG.iter().filter(|s| s.embedded) {
                println!("  {} = {}", spec.name, spec.revision());
            }
            Ok(())
        }
        Ok(Command::Models) => {
            commands::list_models();
            Ok(())
        }
        Ok(Command::Export { dir, options }) => commands::export_models(&dir, &options),
        Ok(Command::Embed { texts, options }) => commands::embed(texts, &options),
        // Health checkers (a container's HEALTHCHECK) read exit status 1 as unhealthy; 2 is reserved there.
        Ok(Command::Health(options)) => match commands::health(&options) {
            Ok(()) => Ok(()),
            Err(message) => {
                eprintln!("embedding-server: {message}");
                std::process::exit(1);
            }
        },
        // The flags are checked before the models load, so that a typo fails at once.
        Ok(Command::Serve(options)) => cli::serve_config(&options).and_then(|config| {
            cli::models_config(&options)
                .and_then(|models| commands::load_models(&models))
                .and_then(|models| server::serve(config, models))
        }),
        Err(message) => Err(message),
    };
    if let Err(message) = result {
        eprintln!("embedding-server: {message}");
        std::process::exit(2);
    }
}
