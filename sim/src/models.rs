//! The simulator's models (`simple`, `identity_fp32`, `tiny_llm`, the stateful
//! `accumulate`): their metadata, configuration, tensor decoding and arithmetic.
//!
//! Everything here is pure (no time, no I/O), so the wire-level rules (raw little-endian
//! tensors, the 4-byte length prefix of BYTES elements, Triton's classic `simple`
//! arithmetic) are tested directly, without a server. The server module decides *when*
//! a model runs; this module decides *what* it answers.

use infergate_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, model_instance_group::Kind,
    model_metadata_response::TensorMetadata, DataType, InferParameter, ModelConfig,
    ModelInferRequest, ModelInferResponse, ModelInput, ModelInstanceGroup, ModelMetadataResponse,
    ModelOutput, ModelSequenceBatching, ModelTransactionPolicy,
};

/// The version every simulated model reports.
pub(crate) const VERSION: &str = "1";

/// A model the simulator knows how to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Model {
    /// Triton's classic example: `OUTPUT0 = INPUT0 + INPUT1`, `OUTPUT1 = INPUT0 - INPUT1`.
    Simple,
    /// Returns its FP32 input unchanged.
    IdentityFp32,
    /// A decoupled "language model" streaming one token per response.
    TinyLlm,
    /// `simple` under another name: a stand-in "smaller model" for fallback set-ups.
    /// Served only when named in `--models`.
    SimpleSmall,
    /// Stateful (Triton's sequence batcher): `OUTPUT` is the running sum of the
    /// sequence's `INPUT`s so far; the state lives in `sim::sequence`.
    Accumulate,
}

/// Every model, in a fixed order (the order of metrics and statistics).
pub(crate) const ALL_MODELS: [Model; 4] = [
    Model::Simple,
    Model::IdentityFp32,
    Model::TinyLlm,
    Model::Accumulate,
];

/// Every model the simulator can serve: the defaults and the opt-in ones.
pub(crate) const KNOWN_MODELS: [Model; 5] = [
    Model::Simple,
    Model::IdentityFp32,
    Model::TinyLlm,
    Model::SimpleSmall,
    Model::Accumulate,
];

impl Model {
    /// The model named `name`, if the simulator knows it.
    pub(crate) fn from_name(name: &str) -> Option<Model> {
        KNOWN_MODELS.into_iter().find(|m| m.name() == name)
    }

    /// The model's name on the wire.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Model::Simple => "simple",
            Model::IdentityFp32 => "identity_fp32",
            Model::TinyLlm => "tiny_llm",
            Model::SimpleSmall => "simple_small",
            Model::Accumulate => "accumulate",
        }
    }

    /// Whether the model answers zero or more responses per request (streams only).
    pub(crate) fn decoupled(self) -> bool {
        matches!(self, Model::TinyLlm)
    }

    fn inputs(self) -> Vec<(&'static str, &'static str, DataType, Vec<i64>)> {
        match self {
            Model::Simple | Model::SimpleSmall => vec![
                ("INPUT0", "INT32", DataType::TypeInt32, vec![-1, 16]),
                ("INPUT1", "INT32", DataType::TypeInt32, vec![-1, 16]),
            ],
            Model::IdentityFp32 => vec![("INPUT0", "FP32", DataType::TypeFp32, vec![-1])],
            Model::TinyLlm => vec![
                ("text_input", "BYTES", DataType::TypeString, vec![1]),
                ("max_tokens", "INT32", DataType::TypeInt32, vec![1]),
            ],
            Model::Accumulate => vec![("INPUT", "INT32", DataType::TypeInt32, vec![1, 1])],
        }
    }

    fn outputs(self) -> Vec<(&'static str, &'static str, DataType, Vec<i64>)> {
        match self {
            Model::Simple | Model::SimpleSmall => vec![
                ("OUTPUT0", "INT32", DataType::TypeInt32, vec![-1, 16]),
                ("OUTPUT1", "INT32", DataType::TypeInt32, vec![-1, 16]),
            ],
            Model::IdentityFp32 => vec![("OUTPUT0", "FP32", DataType::TypeFp32, vec![-1])],
            Model::TinyLlm => vec![("text_output", "BYTES", DataType::TypeString, vec![1])],
            Model::Accumulate => vec![("OUTPUT", "INT32", DataType::TypeInt32, vec![1, 1])],
        }
    }

    /// The answer to `ModelMetadata`.
    pub(crate) fn metadata(self) -> ModelMetadataResponse {
        let tensor = |(name, dt, _, shape): (&str, &str, DataType, Vec<i64>)| TensorMetadata {
            name: name.to_owned(),
            datatype: dt.to_owned(),
            shape,
        };
        ModelMetadataResponse {
            name: self.name().to_owned(),
            versions: vec![VERSION.to_owned()],
            platform: "simulated".to_owned(),
            inputs: self.inputs().into_iter().map(tensor).collect(),
            outputs: self.outputs().into_iter().map(tensor).collect(),
        }
    }

    /// The answer to `ModelConfig`. Dims exclude the batch dimension when batching.
    pub(crate) fn config(self) -> ModelConfig {
        let batching = matches!(self, Model::Simple | Model::SimpleSmall);
        let dims = |shape: Vec<i64>| {
            if batching {
                shape.into_iter().skip(1).collect()
            } else {
                shape
            }
        };
        ModelConfig {
            name: self.name().to_owned(),
            platform: "simulated".to_owned(),
            backend: "simulated".to_owned(),
            max_batch_size: if batching { 8 } else { 0 },
            input: self
                .inputs()
                .into_iter()
                .map(|(name, _, dt, shape)| ModelInput {
                    name: name.to_owned(),
                    data_type: dt as i32,
                    dims: dims(shape),
                    optional: false,
                })
                .collect(),
            output: self
                .outputs()
                .into_iter()
                .map(|(name, _, dt, shape)| ModelOutput {
                    name: name.to_owned(),
                    data_type: dt as i32,
                    dims: dims(shape),
                })
                .collect(),
            instance_group: vec![ModelInstanceGroup {
                name: format!("{}_0", self.name()),
                count: 1,
                gpus: vec![0],
                kind: Kind::Gpu as i32,
            }],
            dynamic_batching: None,
            sequence_batching: (self == Model::Accumulate).then(|| ModelSequenceBatching {
                max_sequence_idle_microseconds: crate::sequence::DEFAULT_IDLE
                    .as_micros()
                    .try_into()
                    .unwrap_or(u64::MAX),
                direct: Some(Default::default()),
            }),
            parameters: Default::default(),
            model_transaction_policy: Some(ModelTransactionPolicy {
                decoupled: self.decoupled(),
            }),
        }
    }
}

/// A request the model cannot accept; becomes `INVALID_ARGUMENT` (or an in-stream error).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InvalidInput(pub(crate) String);

impl std::fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bytes of tensor data a request carries (raw or typed), for the per-KiB service time.
pub(crate) fn request_tensor_bytes(req: &ModelInferRequest) -> usize {
    let raw: usize = req.raw_input_contents.iter().map(Vec::len).sum();
    let typed: usize = req
        .inputs
        .iter()
        .filter_map(|t| t.contents.as_ref())
        .map(|c| {
            c.bool_contents.len()
                + 4 * (c.int_contents.len() + c.uint_contents.len() + c.fp32_contents.len())
                + 8 * (c.int64_contents.len() + c.uint64_contents.len() + c.fp64_contents.len())
                + c.bytes_contents.iter().map(|b| b.len() + 4).sum::<usize>()
        })
        .sum();
    raw + typed
}

/// Little-endian INT32 elements of a raw tensor; `None` when the length is not a multiple of 4.
pub(crate) fn decode_i32_le(raw: &[u8]) -> Option<Vec<i32>> {
    if !raw.len().is_multiple_of(4) {
        return None;
    }
    Some(
        raw.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Little-endian encoding of INT32 elements.
pub(crate) fn encode_i32_le(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// BYTES elements of a raw tensor: each is a 4-byte little-endian length, then that many
/// bytes. `None` when the buffer is truncated.
pub(crate) fn decode_bytes_elements(raw: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if tail.len() < len {
            return None;
        }
        let (elem, tail) = tail.split_at(len);
        out.push(elem);
        rest = tail;
    }
    Some(out)
}

/// Raw encoding of one BYTES element.
pub(crate) fn encode_bytes_element(elem: &[u8]) -> Vec<u8> {
    let len = u32::try_from(elem.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + elem.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(elem);
    out
}

/// `simple`'s arithmetic: element-wise wrapping sum and difference.
pub(crate) fn simple_math(a: &[i32], b: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let sum = a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y)).collect();
    let diff = a.iter().zip(b).map(|(x, y)| x.wrapping_sub(*y)).collect();
    (sum, diff)
}

/// Number of elements a shape holds; errors on negative dims or overflow.
fn element_count(name: &str, shape: &[i64]) -> Result<usize, InvalidInput> {
    shape.iter().try_fold(1usize, |acc, d| {
        usize::try_from(*d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| InvalidInput(format!("input '{name}' has an invalid shape {shape:?}")))
    })
}

/// One input of a request, with its raw bytes when sent as `raw_input_contents`.
struct Input<'a> {
    tensor: &'a InferInputTensor,
    raw: Option<&'a [u8]>,
    count: usize,
}

/// Finds exactly the `expected` inputs (name, datatype), rejecting missing, extra and
/// mistyped ones. Returned in `expected` order.
fn gather<'a>(
    req: &'a ModelInferRequest,
    expected: &[(&str, &str)],
) -> Result<Vec<Input<'a>>, InvalidInput> {
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return Err(InvalidInput(format!(
            "expected {} raw_input_contents (one per input), got {}",
            req.inputs.len(),
            req.raw_input_contents.len()
        )));
    }
    for t in &req.inputs {
        if !expected.iter().any(|(n, _)| *n == t.name) {
            return Err(InvalidInput(format!(
                "unexpected input '{}' for model '{}'",
                t.name, req.model_name
            )));
        }
    }
    let mut out = Vec::with_capacity(expected.len());
    for (name, datatype) in expected {
        let mut found = req
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, t)| t.name == *name);
        let (i, tensor) = found
            .next()
            .ok_or_else(|| InvalidInput(format!("missing input '{name}'")))?;
        if found.next().is_some() {
            return Err(InvalidInput(format!("input '{name}' given more than once")));
        }
        if tensor.datatype != *datatype {
            return Err(InvalidInput(format!(
                "input '{name}' has datatype {}, expected {datatype}",
                tensor.datatype
            )));
        }
        let count = element_count(name, &tensor.shape)?;
        out.push(Input {
            tensor,
            raw: req.raw_input_contents.get(i).map(Vec::as_slice),
            count,
        });
    }
    Ok(out)
}

fn mismatch(name: &str, expected: usize, got: usize) -> InvalidInput {
    InvalidInput(format!(
        "input '{name}': shape holds {expected} elements but {got} were sent"
    ))
}

fn int32_values(input: &Input<'_>) -> Result<Vec<i32>, InvalidInput> {
    let name = &input.tensor.name;
    let values = match input.raw {
        Some(raw) => decode_i32_le(raw).ok_or_else(|| {
            InvalidInput(format!(
                "input '{name}': raw INT32 data of {} bytes is not a multiple of 4",
                raw.len()
            ))
        })?,
        None => input
            .tensor
            .contents
            .as_ref()
            .map(|c| c.int_contents.clone())
            .unwrap_or_default(),
    };
    if values.len() != input.count {
        return Err(mismatch(name, input.count, values.len()));
    }
    Ok(values)
}

fn bytes_values(input: &Input<'_>) -> Result<Vec<Vec<u8>>, InvalidInput> {
    let name = &input.tensor.name;
    let values = match input.raw {
        Some(raw) => decode_bytes_elements(raw)
            .ok_or_else(|| InvalidInput(format!("input '{name}': truncated raw BYTES data")))?
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect(),
        None => input
            .tensor
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.clone())
            .unwrap_or_default(),
    };
    if values.len() != input.count {
        return Err(mismatch(name, input.count, values.len()));
    }
    Ok(values)
}

/// An output tensor ready to be put in a response.
struct Output {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
    raw: Vec<u8>,
}

/// A response to `req` carrying `outputs`, filtered and ordered by the request's
/// `outputs` list when it has one.
fn respond(
    req: &ModelInferRequest,
    outputs: Vec<Output>,
) -> Result<ModelInferResponse, InvalidInput> {
    let selected: Vec<Output> = if req.outputs.is_empty() {
        outputs
    } else {
        let mut outputs: Vec<Option<Output>> = outputs.into_iter().map(Some).collect();
        let mut selected = Vec::with_capacity(req.outputs.len());
        for wanted in &req.outputs {
            let slot = outputs
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| o.name == wanted.name))
                .and_then(Option::take)
                .ok_or_else(|| {
                    InvalidInput(format!(
                        "unknown or repeated requested output '{}' for model '{}'",
                        wanted.name, req.model_name
                    ))
                })?;
            selected.push(slot);
        }
        selected
    };
    let mut resp = base_response(req);
    for o in selected {
        resp.outputs.push(InferOutputTensor {
            name: o.name.to_owned(),
            datatype: o.datatype.to_owned(),
            shape: o.shape,
            parameters: Default::default(),
            contents: None,
        });
        resp.raw_output_contents.push(o.raw);
    }
    Ok(resp)
}

/// An empty response that names the model and echoes the request's id.
pub(crate) fn base_response(req: &ModelInferRequest) -> ModelInferResponse {
    ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: VERSION.to_owned(),
        id: req.id.clone(),
        ..Default::default()
    }
}

/// Runs `simple`.
pub(crate) fn run_simple(req: &ModelInferRequest) -> Result<ModelInferResponse, InvalidInput> {
    let inputs = gather(req, &[("INPUT0", "INT32"), ("INPUT1", "INT32")])?;
    let (in0, in1) = (&inputs[0], &inputs[1]);
    if in0.tensor.shape != in1.tensor.shape {
        return Err(InvalidInput(format!(
            "input 'INPUT1' has shape {:?}, but 'INPUT0' has {:?}",
            in1.tensor.shape, in0.tensor.shape
        )));
    }
    let a = int32_values(in0)?;
    let b = int32_values(in1)?;
    let (sum, diff) = simple_math(&a, &b);
    let shape = in0.tensor.shape.clone();
    respond(
        req,
        vec![
            Output {
                name: "OUTPUT0",
                datatype: "INT32",
                shape: shape.clone(),
                raw: encode_i32_le(&sum),
            },
            Output {
                name: "OUTPUT1",
                datatype: "INT32",
                shape,
                raw: encode_i32_le(&diff),
            },
        ],
    )
}

/// Runs `identity_fp32`.
pub(crate) fn run_identity(req: &ModelInferRequest) -> Result<ModelInferResponse, InvalidInput> {
    let inputs = gather(req, &[("INPUT0", "FP32")])?;
    let input = &inputs[0];
    let raw = match input.raw {
        Some(raw) => {
            if raw.len() != input.count.saturating_mul(4) {
                return Err(InvalidInput(format!(
                    "input 'INPUT0': shape holds {} FP32 elements ({} bytes) but {} bytes were sent",
                    input.count,
                    input.count.saturating_mul(4),
                    raw.len()
                )));
            }
            raw.to_vec()
        }
        None => {
            let values = input
                .tensor
                .contents
                .as_ref()
                .map(|c| c.fp32_contents.as_slice())
                .unwrap_or_default();
            if values.len() != input.count {
                return Err(mismatch("INPUT0", input.count, values.len()));
            }
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    };
    respond(
        req,
        vec![Output {
            name: "OUTPUT0",
            datatype: "FP32",
            shape: input.tensor.shape.clone(),
            raw,
        }],
    )
}

/// `accumulate`'s input: the one INT32 element of `INPUT` [1,1].
pub(crate) fn accumulate_input(req: &ModelInferRequest) -> Result<i32, InvalidInput> {
    let inputs = gather(req, &[("INPUT", "INT32")])?;
    let input = &inputs[0];
    if input.tensor.shape != [1, 1] {
        return Err(InvalidInput(format!(
            "input 'INPUT' has shape {:?}, expected [1, 1]",
            input.tensor.shape
        )));
    }
    match int32_values(input)?.as_slice() {
        [v] => Ok(*v),
        other => Err(mismatch("INPUT", 1, other.len())),
    }
}

/// `accumulate`'s answer: `OUTPUT` [1,1] holding `sum`.
pub(crate) fn accumulate_response(
    req: &ModelInferRequest,
    sum: i32,
) -> Result<ModelInferResponse, InvalidInput> {
    respond(
        req,
        vec![Output {
            name: "OUTPUT",
            datatype: "INT32",
            shape: vec![1, 1],
            raw: encode_i32_le(&[sum]),
        }],
    )
}

/// `tiny_llm`'s validated request: the prompt and how many tokens to generate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LlmRequest {
    pub(crate) prompt: Vec<u8>,
    pub(crate) max_tokens: u32,
}

/// Validates a `tiny_llm` request.
pub(crate) fn parse_llm(req: &ModelInferRequest) -> Result<LlmRequest, InvalidInput> {
    let inputs = gather(req, &[("text_input", "BYTES"), ("max_tokens", "INT32")])?;
    let mut text = bytes_values(&inputs[0])?;
    let max = int32_values(&inputs[1])?;
    if text.len() != 1 {
        return Err(InvalidInput(format!(
            "input 'text_input' must hold exactly one element, got {}",
            text.len()
        )));
    }
    let max_tokens = match max.as_slice() {
        [n] => u32::try_from(*n).map_err(|_| {
            InvalidInput(format!("input 'max_tokens' must not be negative, got {n}"))
        })?,
        other => {
            return Err(InvalidInput(format!(
                "input 'max_tokens' must hold exactly one element, got {}",
                other.len()
            )))
        }
    };
    Ok(LlmRequest {
        prompt: text.pop().unwrap_or_default(),
        max_tokens,
    })
}

/// The text of generated token `i`.
pub(crate) fn token_text(i: u32) -> String {
    format!("tok{i} ")
}

/// One streamed `tiny_llm` response. `token` is `None` for the empty final response of a
/// request that asked for zero tokens.
pub(crate) fn llm_response(
    req: &ModelInferRequest,
    token: Option<&str>,
    last: bool,
) -> ModelInferResponse {
    let mut resp = base_response(req);
    if let Some(token) = token {
        resp.outputs.push(InferOutputTensor {
            name: "text_output".to_owned(),
            datatype: "BYTES".to_owned(),
            shape: vec![1],
            parameters: Default::default(),
            contents: None,
        });
        resp.raw_output_contents
            .push(encode_bytes_element(token.as_bytes()));
    }
    resp.parameters.insert(
        "triton_final_response".to_owned(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(last)),
        },
    );
    resp
}

/// Reported GPU utilization: busy slots plus the invisible share, as a fraction of all
/// slots, capped at 1.
pub(crate) fn gpu_utilization(busy: usize, hidden_load: f64, slots: usize) -> f64 {
    if slots == 0 {
        return 1.0;
    }
    let slots_f = slots as f64;
    ((busy as f64 + hidden_load.clamp(0.0, 1.0) * slots_f) / slots_f).clamp(0.0, 1.0)
}

/// Permits the invisible work holds: `round(h * slots)`, leaving at least one.
pub(crate) fn hidden_permits(hidden_load: f64, slots: usize) -> usize {
    let want = (hidden_load.clamp(0.0, 1.0) * slots as f64).round() as usize;
    want.min(slots.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::{
        model_infer_request::InferRequestedOutputTensor, InferTensorContents,
    };

    fn tensor(name: &str, dt: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape,
            ..Default::default()
        }
    }

    fn err(r: Result<ModelInferResponse, InvalidInput>) -> String {
        r.err().map(|e| e.0).unwrap_or_default()
    }

    fn simple_raw(a: &[i32], b: &[i32]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "simple".into(),
            id: "r1".into(),
            inputs: vec![
                tensor("INPUT0", "INT32", vec![1, a.len() as i64]),
                tensor("INPUT1", "INT32", vec![1, b.len() as i64]),
            ],
            raw_input_contents: vec![encode_i32_le(a), encode_i32_le(b)],
            ..Default::default()
        }
    }

    #[test]
    fn int32_roundtrip_and_bad_length() {
        let v = vec![0, 1, -1, i32::MAX, i32::MIN];
        assert_eq!(decode_i32_le(&encode_i32_le(&v)), Some(v));
        assert_eq!(decode_i32_le(&[1, 2, 3]), None);
        assert_eq!(decode_i32_le(&[]), Some(vec![]));
    }

    #[test]
    fn bytes_elements() {
        let mut raw = encode_bytes_element(b"hello");
        raw.extend(encode_bytes_element(b""));
        assert_eq!(
            decode_bytes_elements(&raw),
            Some(vec![&b"hello"[..], &b""[..]])
        );
        assert_eq!(decode_bytes_elements(&raw[..6]), None);
        assert_eq!(decode_bytes_elements(&[5, 0]), None);
        assert_eq!(decode_bytes_elements(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn simple_math_wraps() {
        let (s, d) = simple_math(&[1, i32::MAX, i32::MIN], &[2, 1, 1]);
        assert_eq!(s, vec![3, i32::MIN, i32::MIN + 1]);
        assert_eq!(d, vec![-1, i32::MAX - 1, i32::MAX]);
    }

    #[test]
    fn simple_raw_and_typed() {
        let a: Vec<i32> = (0..16).collect();
        let b = vec![1; 16];
        let resp = run_simple(&simple_raw(&a, &b)).expect("valid request");
        assert_eq!(resp.id, "r1");
        assert_eq!(resp.model_version, "1");
        assert_eq!(resp.outputs.len(), 2);
        assert_eq!(resp.outputs[0].shape, vec![1, 16]);
        assert_eq!(
            decode_i32_le(&resp.raw_output_contents[1]),
            Some((-1..15).collect())
        );

        let mut typed = simple_raw(&a, &b);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(InferTensorContents {
            int_contents: a.clone(),
            ..Default::default()
        });
        typed.inputs[1].contents = Some(InferTensorContents {
            int_contents: b.clone(),
            ..Default::default()
        });
        typed.outputs = vec![InferRequestedOutputTensor {
            name: "OUTPUT1".into(),
            ..Default::default()
        }];
        let resp = run_simple(&typed).expect("valid request");
        assert_eq!(resp.outputs.len(), 1);
        assert_eq!(resp.outputs[0].name, "OUTPUT1");
    }

    #[test]
    fn simple_rejects_bad_inputs() {
        let mut req = simple_raw(&[1; 16], &[1; 16]);
        req.inputs[1].datatype = "FP32".into();
        assert!(err(run_simple(&req)).contains("INPUT1"));

        let mut req = simple_raw(&[1; 16], &[1; 16]);
        req.raw_input_contents[0].truncate(60);
        assert!(err(run_simple(&req)).contains("INPUT0"));

        let mut req = simple_raw(&[1; 16], &[1; 16]);
        req.inputs.pop();
        req.raw_input_contents.pop();
        assert!(err(run_simple(&req)).contains("INPUT1"));

        let mut req = simple_raw(&[1; 16], &[1; 16]);
        req.inputs[0].shape = vec![-1, 16];
        assert!(run_simple(&req).is_err());
    }

    #[test]
    fn llm_parse() {
        let req = ModelInferRequest {
            model_name: "tiny_llm".into(),
            inputs: vec![
                tensor("text_input", "BYTES", vec![1]),
                tensor("max_tokens", "INT32", vec![1]),
            ],
            raw_input_contents: vec![encode_bytes_element(b"hi"), encode_i32_le(&[3])],
            ..Default::default()
        };
        assert_eq!(
            parse_llm(&req),
            Ok(LlmRequest {
                prompt: b"hi".to_vec(),
                max_tokens: 3
            })
        );
        let last = llm_response(&req, Some(&token_text(0)), true);
        assert_eq!(
            decode_bytes_elements(&last.raw_output_contents[0]),
            Some(vec![&b"tok0 "[..]])
        );
    }

    #[test]
    fn utilization_formula() {
        assert_eq!(gpu_utilization(0, 0.0, 4), 0.0);
        assert_eq!(gpu_utilization(2, 0.0, 4), 0.5);
        assert_eq!(gpu_utilization(2, 0.25, 4), 0.75);
        assert_eq!(gpu_utilization(4, 0.5, 4), 1.0);
        assert_eq!(hidden_permits(0.3, 4), 1);
        assert_eq!(hidden_permits(1.0, 4), 3);
        assert_eq!(hidden_permits(0.5, 1), 0);
    }
}
