//! Writes a pre-encoded gRPC request body (5-byte frame header + ModelInferRequest) for
//! load generators the project did not write, such as h2load:
//!
//! ```text
//! cargo run --release -p infergate-client --example grpc_body -- simple /tmp/simple.bin
//! cargo run --release -p infergate-client --example grpc_body -- identity_fp32 /tmp/1m.bin 1048576
//! h2load -n 20000 -c 1 -m 32 -d /tmp/simple.bin \
//!   -H 'content-type: application/grpc' -H 'te: trailers' \
//!   http://127.0.0.1:8001/inference.GRPCInferenceService/ModelInfer
//! ```

use infergate_proto::inference::model_infer_request::InferInputTensor;
use infergate_proto::inference::ModelInferRequest;
use prost::Message;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(path)) = (args.first(), args.get(1)) else {
        eprintln!("usage: grpc_body simple|identity_fp32 OUT_FILE [PAYLOAD_BYTES]");
        return ExitCode::from(2);
    };
    let payload: usize = match args.get(2).map(|s| s.parse()) {
        None => 1 << 20,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("PAYLOAD_BYTES must be a number of bytes");
            return ExitCode::from(2);
        }
    };
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let request = match model.as_str() {
        "simple" => {
            let raw = |f: &dyn Fn(i32) -> i32| {
                (0..16)
                    .flat_map(|i| f(i).to_le_bytes())
                    .collect::<Vec<u8>>()
            };
            ModelInferRequest {
                model_name: "simple".into(),
                inputs: vec![
                    tensor("INPUT0", "INT32", vec![1, 16]),
                    tensor("INPUT1", "INT32", vec![1, 16]),
                ],
                raw_input_contents: vec![raw(&|i| i), raw(&|_| 1)],
                ..Default::default()
            }
        }
        "identity_fp32" => {
            let n = payload / 4;
            ModelInferRequest {
                model_name: "identity_fp32".into(),
                inputs: vec![tensor("INPUT0", "FP32", vec![1, n as i64])],
                raw_input_contents: vec![(0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()],
                ..Default::default()
            }
        }
        other => {
            eprintln!("unknown model `{other}`: simple or identity_fp32");
            return ExitCode::from(2);
        }
    };
    let body = request.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    match std::fs::write(path, &framed) {
        Ok(()) => {
            println!("{path}: {} bytes", framed.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot write {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
