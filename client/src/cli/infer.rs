//! `infergate-cli infer`: one ModelInfer call with inputs from flags or a JSON file, or a
//! token stream from a decoupled model with --stream.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use infergate_client::input::{
    parse_infer_json, parse_input_flag, simple_default_inputs, InferSpec,
};
use infergate_client::tensor::{decode_outputs, parameter_to_json};
use infergate_client::ClientError;
use serde_json::{json, Map, Value};

use super::{emitln, note, print_table, to_json, Cli};

/// Values shown per output in the table before the rest is elided (all of them with --json).
const TABLE_VALUES: usize = 32;

/// Flags of `infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model to call [default: simple, or tiny_llm with --stream]
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// Model version (empty: the server's choice)
    #[arg(long, default_value = "")]
    pub model_version: String,

    /// An input as NAME:DATATYPE:SHAPE:VALUES, comma-separated (repeatable), e.g.
    /// INPUT0:INT32:1,16:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15. SHAPE -1 means "the number of
    /// values". For `simple` with no inputs, INPUT0 = 0..16 and INPUT1 = all ones are sent.
    #[arg(long = "input", short = 'i', value_name = "NAME:DATATYPE:SHAPE:VALUES")]
    pub inputs: Vec<String>,

    /// A request in the KServe v2 REST JSON shape: {"id":..,"parameters":{..},
    /// "inputs":[{"name":..,"datatype":..,"shape":[..],"data":[..]}],"outputs":["OUTPUT0"]}
    #[arg(long, value_name = "FILE.json", conflicts_with = "inputs")]
    pub input_file: Option<PathBuf>,

    /// Ask only for this output (repeatable; default: all outputs)
    #[arg(long = "output", short = 'o', value_name = "NAME")]
    pub outputs: Vec<String>,

    /// Request id
    #[arg(long)]
    pub id: Option<String>,

    /// Print the response as KServe v2 JSON instead of a table
    #[arg(long)]
    pub json: bool,

    /// Stream tokens from a decoupled model (ModelStreamInfer), printing each as it arrives
    #[arg(long)]
    pub stream: bool,

    /// Prompt sent as BYTES `text_input` with --stream
    #[arg(long, default_value = "Hello", requires = "stream")]
    pub prompt: String,

    /// Tokens to ask for, sent as INT32 `max_tokens` with --stream
    #[arg(long, default_value_t = 16, requires = "stream")]
    pub max_tokens: u32,
}

/// Runs `infer`.
pub async fn run(cli: &Cli, args: &InferArgs) -> Result<ExitCode, ClientError> {
    if args.stream {
        return run_stream(cli, args).await;
    }
    let model = args.model.clone().unwrap_or_else(|| "simple".to_string());
    let spec = build_spec(&model, args)?;
    let mut request = spec.into_request(&model)?;
    request.model_version = args.model_version.clone();

    let client = cli.client().await?;
    let response = client.infer_full(request).await?;
    let backend = response
        .metadata()
        .get("sim-name")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = response.into_inner();
    let outputs = decode_outputs(&resp)?;

    if args.json {
        let parameters: Map<String, Value> = resp
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), parameter_to_json(v)))
            .collect();
        let outs: Vec<Value> = outputs
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": t.shape,
                    "data": t.data.to_json(),
                })
            })
            .collect();
        let mut doc = json!({
            "model_name": resp.model_name,
            "model_version": resp.model_version,
            "id": resp.id,
            "parameters": parameters,
            "outputs": outs,
        });
        if let (Some(b), Some(obj)) = (&backend, doc.as_object_mut()) {
            obj.insert("backend".into(), Value::from(b.clone()));
        }
        emitln(&to_json(&doc)?)?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut head = format!("model {}", resp.model_name);
    if !resp.model_version.is_empty() {
        head.push_str(&format!("  version {}", resp.model_version));
    }
    if !resp.id.is_empty() {
        head.push_str(&format!("  id {}", resp.id));
    }
    if let Some(b) = backend {
        head.push_str(&format!("  backend {b}"));
    }
    emitln(&head)?;
    let rows: Vec<Vec<String>> = outputs
        .iter()
        .map(|t| {
            let values = t.data.to_strings();
            let mut shown = values
                .iter()
                .take(TABLE_VALUES)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if values.len() > TABLE_VALUES {
                shown.push_str(&format!(", … ({} more)", values.len() - TABLE_VALUES));
            }
            vec![
                t.name.clone(),
                t.datatype.clone(),
                format!("{:?}", t.shape),
                format!("[{shown}]"),
            ]
        })
        .collect();
    print_table(&["OUTPUT", "DATATYPE", "SHAPE", "VALUES"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

/// Collects the inputs from --input-file, --input flags or the `simple` defaults.
fn build_spec(model: &str, args: &InferArgs) -> Result<InferSpec, ClientError> {
    let mut spec = if let Some(path) = &args.input_file {
        let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
            path: path.display().to_string(),
            source,
        })?;
        parse_infer_json(&text)
            .map_err(|e| ClientError::InvalidInput(format!("{}: {e}", path.display())))?
    } else {
        let inputs = if args.inputs.is_empty() && model == "simple" {
            simple_default_inputs()
        } else if args.inputs.is_empty() {
            return Err(ClientError::InvalidInput(format!(
                "model {model} needs inputs: pass --input NAME:DATATYPE:SHAPE:VALUES or --input-file FILE.json"
            )));
        } else {
            args.inputs
                .iter()
                .map(|s| parse_input_flag(s))
                .collect::<Result<Vec<_>, _>>()?
        };
        InferSpec {
            inputs: inputs
                .into_iter()
                .map(|t| (t, Default::default()))
                .collect(),
            ..Default::default()
        }
    };
    if let Some(id) = &args.id {
        spec.id = id.clone();
    }
    if !args.outputs.is_empty() {
        spec.outputs = args
            .outputs
            .iter()
            .map(|o| (o.clone(), Default::default()))
            .collect();
    }
    Ok(spec)
}

/// `infer --stream`: prints tokens as they arrive.
async fn run_stream(cli: &Cli, args: &InferArgs) -> Result<ExitCode, ClientError> {
    let model = args.model.clone().unwrap_or_else(|| "tiny_llm".to_string());
    let client = cli.client().await?;
    let json = args.json;
    let tokens = client
        .generate_with(&model, &args.prompt, args.max_tokens, |token| {
            if !json {
                let mut out = std::io::stdout().lock();
                // A closed stdout (e.g. piped into `head`) is not worth failing the call over.
                let _ = out.write_all(token.as_bytes());
                let _ = out.flush();
            }
        })
        .await;
    let tokens = match tokens {
        Ok(t) => t,
        Err(e) => {
            if !json {
                // Ends the partial line; the call's error matters more than stdout's.
                let _ = emitln("");
            }
            return Err(e);
        }
    };
    if json {
        emitln(&to_json(
            &json!({ "model_name": model, "tokens": tokens, "text": tokens.concat() }),
        )?)?;
    } else {
        emitln("")?;
        note(&format!("({} tokens)", tokens.len()));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use infergate_client::TensorData;

    fn infer_args(argv: &[&str]) -> InferArgs {
        let mut full = vec!["infergate-cli", "infer"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("parses").command {
            Command::Infer(a) => a,
            other => panic!("not infer: {other:?}"),
        }
    }

    #[test]
    fn simple_gets_default_inputs() {
        let args = infer_args(&[]);
        let spec = build_spec("simple", &args).expect("defaults");
        assert_eq!(spec.inputs.len(), 2);
        assert_eq!(spec.inputs[0].0.data, TensorData::Int32((0..16).collect()));
    }

    #[test]
    fn other_models_need_inputs() {
        let args = infer_args(&["--model", "identity_fp32"]);
        assert!(build_spec("identity_fp32", &args).is_err());
        let args = infer_args(&[
            "--model",
            "identity_fp32",
            "--input",
            "INPUT0:FP32:2:1.5,2",
            "--output",
            "OUTPUT0",
            "--id",
            "r1",
        ]);
        let spec = build_spec("identity_fp32", &args).expect("valid");
        assert_eq!(spec.inputs[0].0.data, TensorData::Fp32(vec![1.5, 2.0]));
        assert_eq!(spec.outputs[0].0, "OUTPUT0");
        assert_eq!(spec.id, "r1");
    }

    #[test]
    fn missing_input_file_is_an_error() {
        let args = infer_args(&["--input-file", "/nonexistent/request.json"]);
        assert!(matches!(
            build_spec("simple", &args),
            Err(ClientError::Io { .. })
        ));
    }

    #[test]
    fn input_and_input_file_conflict() {
        let argv = [
            "infergate-cli",
            "infer",
            "--input",
            "A:INT32:1:1",
            "--input-file",
            "x.json",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
