//! Parsing inference inputs given by people: `--input NAME:DATATYPE:SHAPE:VALUES` flags and
//! KServe v2 REST-style JSON request files.

use std::collections::HashMap;

use infergate_proto::inference::{
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    InferParameter, ModelInferRequest,
};
use serde_json::Value;

use crate::tensor::{json_to_parameter, Tensor, TensorData};
use crate::ClientError;

/// An inference request described in the KServe v2 REST JSON shape:
/// `{"id": .., "parameters": {..}, "inputs": [{"name", "datatype", "shape", "data", "parameters"?}],
/// "outputs": ["OUTPUT0" | {"name": "OUTPUT0", "parameters"?}]}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferSpec {
    /// Request id (may be empty).
    pub id: String,
    /// Request-level parameters.
    pub parameters: HashMap<String, InferParameter>,
    /// Inputs, with per-input parameters.
    pub inputs: Vec<(Tensor, HashMap<String, InferParameter>)>,
    /// Requested outputs with their parameters; empty asks for all.
    pub outputs: Vec<(String, HashMap<String, InferParameter>)>,
}

impl InferSpec {
    /// Turns the spec into a request for `model`, inputs encoded as `raw_input_contents`.
    pub fn into_request(self, model: &str) -> Result<ModelInferRequest, ClientError> {
        let mut req = ModelInferRequest {
            model_name: model.to_string(),
            id: self.id,
            parameters: self.parameters,
            ..Default::default()
        };
        for (t, parameters) in self.inputs {
            t.validate()?;
            req.raw_input_contents.push(t.data.to_raw());
            req.inputs.push(InferInputTensor {
                name: t.name,
                datatype: t.data.datatype().to_string(),
                shape: t.shape,
                parameters,
                contents: None,
            });
        }
        req.outputs = self
            .outputs
            .into_iter()
            .map(|(name, parameters)| InferRequestedOutputTensor { name, parameters })
            .collect();
        Ok(req)
    }
}

/// Parses `NAME:DATATYPE:SHAPE:VALUES`, e.g. `INPUT0:INT32:1,16:1,2,3,...`.
///
/// SHAPE is comma-separated dimensions (empty for a scalar); VALUES is comma-separated
/// elements. For BYTES each element is taken as text (so it cannot contain a comma; use
/// `--input-file` for that). If SHAPE is `-1` the shape becomes the element count.
pub fn parse_input_flag(flag: &str) -> Result<Tensor, ClientError> {
    let bad = |why: &str| {
        ClientError::InvalidInput(format!(
            "--input {flag:?}: {why} (expected NAME:DATATYPE:SHAPE:VALUES, e.g. INPUT0:INT32:1,4:1,2,3,4)"
        ))
    };
    let mut parts = flag.splitn(4, ':');
    let (Some(name), Some(datatype), Some(shape), Some(values)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("it needs four ':'-separated parts"));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    let mut shape: Vec<i64> = split_list(shape)
        .map(|d| {
            d.parse::<i64>()
                .map_err(|_| bad(&format!("{d:?} is not a dimension")))
        })
        .collect::<Result<_, _>>()?;
    let datatype = datatype.trim().to_ascii_uppercase();
    let values: Vec<Value> = if datatype == "BYTES" {
        split_list(values)
            .map(|v| Value::String(v.to_string()))
            .collect()
    } else {
        split_list(values)
            .map(|v| {
                serde_json::from_str::<Value>(v)
                    .or_else(|_| match v.to_ascii_lowercase().as_str() {
                        "nan" | "inf" | "+inf" | "-inf" | "infinity" | "-infinity" => {
                            Ok(Value::String(v.to_string()))
                        }
                        _ => Err(()),
                    })
                    .map_err(|_| bad(&format!("{v:?} is not a {datatype} value")))
            })
            .collect::<Result<_, _>>()?
    };
    let data = TensorData::from_json(&datatype, &values)?;
    if shape == [-1] {
        shape = vec![data.len() as i64];
    }
    let t = Tensor::new(name, shape, data);
    t.validate()?;
    Ok(t)
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// Parses a KServe v2 REST-style JSON request (see [`InferSpec`]).
pub fn parse_infer_json(text: &str) -> Result<InferSpec, ClientError> {
    let root: Value = serde_json::from_str(text)
        .map_err(|e| ClientError::InvalidInput(format!("not valid JSON: {e}")))?;
    let obj = root
        .as_object()
        .ok_or_else(|| ClientError::InvalidInput("the request must be a JSON object".into()))?;
    let mut spec = InferSpec {
        id: match obj.get("id") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        },
        parameters: parse_parameters(obj.get("parameters"), "parameters")?,
        ..Default::default()
    };
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| ClientError::InvalidInput("\"inputs\" must be an array".into()))?;
    for (i, input) in inputs.iter().enumerate() {
        let field = |key: &str| {
            input
                .get(key)
                .ok_or_else(|| ClientError::InvalidInput(format!("inputs[{i}] has no \"{key}\"")))
        };
        let name = field("name")?.as_str().ok_or_else(|| {
            ClientError::InvalidInput(format!("inputs[{i}].name must be a string"))
        })?;
        let datatype = field("datatype")?.as_str().ok_or_else(|| {
            ClientError::InvalidInput(format!("inputs[{i}].datatype must be a string"))
        })?;
        let shape: Vec<i64> = field("shape")?
            .as_array()
            .ok_or_else(|| {
                ClientError::InvalidInput(format!("inputs[{i}].shape must be an array"))
            })?
            .iter()
            .map(|d| {
                d.as_i64().ok_or_else(|| {
                    ClientError::InvalidInput(format!(
                        "inputs[{i}].shape holds {d}, not an integer"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let data = match field("data")? {
            Value::Array(values) => TensorData::from_json(datatype, values),
            scalar => TensorData::from_json(datatype, std::slice::from_ref(scalar)),
        }
        .map_err(|e| ClientError::InvalidInput(format!("inputs[{i}] ({name}): {e}")))?;
        let tensor = Tensor::new(name, shape, data);
        tensor.validate()?;
        let params = parse_parameters(input.get("parameters"), &format!("inputs[{i}].parameters"))?;
        spec.inputs.push((tensor, params));
    }
    if let Some(outputs) = obj.get("outputs") {
        let outputs = outputs
            .as_array()
            .ok_or_else(|| ClientError::InvalidInput("\"outputs\" must be an array".into()))?;
        for (i, out) in outputs.iter().enumerate() {
            let entry = match out {
                Value::String(name) => (name.clone(), HashMap::new()),
                Value::Object(o) => {
                    let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                        ClientError::InvalidInput(format!("outputs[{i}] has no string \"name\""))
                    })?;
                    let params =
                        parse_parameters(o.get("parameters"), &format!("outputs[{i}].parameters"))?;
                    (name.to_string(), params)
                }
                other => {
                    return Err(ClientError::InvalidInput(format!(
                        "outputs[{i}] is {other}; expected a name or {{\"name\": ..}}"
                    )))
                }
            };
            spec.outputs.push(entry);
        }
    }
    Ok(spec)
}

fn parse_parameters(
    v: Option<&Value>,
    what: &str,
) -> Result<HashMap<String, InferParameter>, ClientError> {
    match v {
        None | Some(Value::Null) => Ok(HashMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                json_to_parameter(v)
                    .map(|p| (k.clone(), p))
                    .map_err(|e| ClientError::InvalidInput(format!("{what}.{k}: {e}")))
            })
            .collect(),
        Some(other) => Err(ClientError::InvalidInput(format!(
            "{what} must be an object, not {other}"
        ))),
    }
}

/// The inputs Triton's `simple` example sends: INPUT0 = 0..16, INPUT1 = all ones, shape [1, 16].
pub fn simple_default_inputs() -> Vec<Tensor> {
    vec![
        Tensor::new("INPUT0", vec![1, 16], TensorData::Int32((0..16).collect())),
        Tensor::new("INPUT1", vec![1, 16], TensorData::Int32(vec![1; 16])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::infer_parameter::ParameterChoice;

    #[test]
    fn input_flag_parses_ints() {
        let t = parse_input_flag("INPUT0:INT32:1,4:1,2,3,-4").expect("valid");
        assert_eq!(t.name, "INPUT0");
        assert_eq!(t.datatype, "INT32");
        assert_eq!(t.shape, vec![1, 4]);
        assert_eq!(t.data, TensorData::Int32(vec![1, 2, 3, -4]));
    }

    #[test]
    fn input_flag_parses_floats_bytes_bools_and_lowercase_types() {
        let t = parse_input_flag("X:fp32:3:1.5, 2 ,nan").expect("valid");
        match t.data {
            TensorData::Fp32(v) => {
                assert_eq!(&v[..2], &[1.5, 2.0]);
                assert!(v[2].is_nan());
            }
            other => panic!("wrong data {other:?}"),
        }
        let t = parse_input_flag("text_input:BYTES:1:hello: world").expect("valid");
        assert_eq!(t.data, TensorData::Bytes(vec![b"hello: world".to_vec()]));
        let t = parse_input_flag("B:BOOL:2:true,false").expect("valid");
        assert_eq!(t.data, TensorData::Bool(vec![true, false]));
        let t = parse_input_flag("S:INT64::7").expect("scalar");
        assert!(t.shape.is_empty());
        let t = parse_input_flag("V:INT8:-1:1,2,3").expect("inferred shape");
        assert_eq!(t.shape, vec![3]);
    }

    #[test]
    fn input_flag_rejects_bad_input() {
        for bad in [
            "INPUT0:INT32:1,4",
            "INPUT0:INT32:1,4:1,2,3",
            "INPUT0:INT32:1,x:1",
            "INPUT0:INT32:1:abc",
            "INPUT0:INT33:1:1",
            "INPUT0:UINT8:1:256",
            ":INT32:1:1",
        ] {
            assert!(parse_input_flag(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn json_request_parses() {
        let text = r#"{
            "id": "req-1",
            "parameters": {"priority": 2, "tag": "x"},
            "inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 4], "data": [[1, 2, 3, 4]]},
                {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"],
                 "parameters": {"binary_data": false}}
            ],
            "outputs": ["OUTPUT0", {"name": "OUTPUT1", "parameters": {"classification": 1}}]
        }"#;
        let spec = parse_infer_json(text).expect("valid");
        assert_eq!(spec.id, "req-1");
        assert_eq!(
            spec.parameters["priority"].parameter_choice,
            Some(ParameterChoice::Int64Param(2))
        );
        assert_eq!(spec.inputs.len(), 2);
        assert_eq!(spec.inputs[0].0.data, TensorData::Int32(vec![1, 2, 3, 4]));
        assert_eq!(
            spec.inputs[1].1["binary_data"].parameter_choice,
            Some(ParameterChoice::BoolParam(false))
        );
        assert_eq!(spec.outputs[0].0, "OUTPUT0");
        assert_eq!(spec.outputs[1].0, "OUTPUT1");

        let req = spec.into_request("simple").expect("request");
        assert_eq!(req.model_name, "simple");
        assert_eq!(req.id, "req-1");
        assert_eq!(req.raw_input_contents.len(), 2);
        assert_eq!(req.raw_input_contents[1], vec![2, 0, 0, 0, b'h', b'i']);
        assert_eq!(req.outputs.len(), 2);
    }

    #[test]
    fn json_request_errors_name_the_field() {
        let cases = [
            ("[]", "object"),
            ("{}", "inputs"),
            (
                r#"{"inputs":[{"datatype":"INT32","shape":[1],"data":[1]}]}"#,
                "name",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"INT32","shape":[2],"data":[1]}]}"#,
                "shape",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"INT32","shape":[1],"data":["x"]}]}"#,
                "inputs[0]",
            ),
            (r#"{"inputs":[],"outputs":[3]}"#, "outputs[0]"),
            (r#"{"inputs":[],"parameters":{"a":[1]}}"#, "parameters.a"),
            ("{not json", "JSON"),
        ];
        for (text, needle) in cases {
            match parse_infer_json(text) {
                Ok(spec) => panic!("{text} parsed as {spec:?}"),
                Err(e) => assert!(e.to_string().contains(needle), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn simple_defaults_match_triton_example() {
        let inputs = simple_default_inputs();
        assert_eq!(inputs[0].data, TensorData::Int32((0..16).collect()));
        assert_eq!(inputs[1].data, TensorData::Int32(vec![1; 16]));
    }
}
