//! `infergate-cli models`: the server's model repository index.

use std::process::ExitCode;

use clap::Args;
use infergate_client::ClientError;
use serde_json::json;

use super::{emitln, print_table, to_json, Cli};

/// Flags of `models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Runs `models`.
pub async fn run(cli: &Cli, args: &ModelsArgs) -> Result<ExitCode, ClientError> {
    let client = cli.client().await?;
    let models = client.repository_index().await?;
    if args.json {
        let list: Vec<_> = models
            .iter()
            .map(|m| json!({"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}))
            .collect();
        emitln(&to_json(&list)?)?;
    } else if models.is_empty() {
        emitln("no models")?;
    } else {
        let rows: Vec<Vec<String>> = models
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.version.clone(),
                    m.state.clone(),
                    m.reason.clone(),
                ]
            })
            .collect();
        print_table(&["NAME", "VERSION", "STATE", "REASON"], &rows)?;
    }
    Ok(ExitCode::SUCCESS)
}
