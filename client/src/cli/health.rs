//! `infergate-cli health`: ServerLive, ServerReady and grpc.health.v1 for the server and each
//! model; exits 1 when the server is not ready.

use std::process::ExitCode;

use clap::Args;
use infergate_client::{code_name, ClientError};
use serde_json::{json, Value};

use super::{emitln, note, print_table, to_json, Cli};

/// Flags of `health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// A check's result as text: the answer, or the gRPC code of the failure.
fn show<T: ToString>(r: &Result<T, ClientError>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => e.code().map(code_name).unwrap_or("ERROR").to_string(),
    }
}

/// Runs `health`.
pub async fn run(cli: &Cli, args: &HealthArgs) -> Result<ExitCode, ClientError> {
    let client = cli.client().await?;
    // ServerLive failing outright (nothing answering) is an error with a hint.
    let live = client.live().await?;
    let ready = client.ready().await;
    let health = client.health("").await;
    let models = client.repository_index().await.unwrap_or_default();

    let mut rows = vec![
        vec!["server".to_string(), "live".to_string(), live.to_string()],
        vec!["server".to_string(), "ready".to_string(), show(&ready)],
        vec![
            "server".to_string(),
            "grpc.health \"\"".to_string(),
            show(&health),
        ],
    ];
    let mut per_model = Vec::new();
    for m in &models {
        let model_ready = client.model_ready(&m.name).await;
        let model_health = client.health(&m.name).await;
        rows.push(vec![
            m.name.clone(),
            "ready".to_string(),
            show(&model_ready),
        ]);
        rows.push(vec![
            m.name.clone(),
            "grpc.health".to_string(),
            show(&model_health),
        ]);
        per_model.push(json!({
            "name": m.name,
            "ready": model_ready.as_ref().ok(),
            "health": show(&model_health),
        }));
    }

    let server_ready = live
        && matches!(ready, Ok(true))
        && match &health {
            Ok(status) => status == "SERVING",
            // A server without grpc.health is judged by ServerReady alone.
            Err(e) => e.code() == Some(tonic::Code::Unimplemented),
        };

    if args.json {
        let doc = json!({
            "live": live,
            "ready": ready.as_ref().ok(),
            "health": show(&health),
            "models": Value::from(per_model),
            "ok": server_ready,
        });
        emitln(&to_json(&doc)?)?;
    } else {
        print_table(&["TARGET", "CHECK", "RESULT"], &rows)?;
        if !server_ready {
            note("not ready");
        }
    }
    Ok(if server_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
