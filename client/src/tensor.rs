//! Typed tensors: building `ModelInferRequest`s from Rust values and decoding responses back.
//!
//! Inputs are always sent as `raw_input_contents` (little-endian, row-major; BYTES elements
//! as a 4-byte little-endian length followed by the bytes), which is what Triton and the
//! simulator answer fastest. Outputs are read from `raw_output_contents` when the server used
//! them, and from the typed `contents` otherwise.

use std::collections::HashMap;

use infergate_proto::inference::{
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use serde_json::Value;

use crate::ClientError;

/// The elements of a tensor, one variant per KServe v2 datatype.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// `BOOL`, one byte per element on the wire.
    Bool(Vec<bool>),
    /// `UINT8`
    Uint8(Vec<u8>),
    /// `UINT16`
    Uint16(Vec<u16>),
    /// `UINT32`
    Uint32(Vec<u32>),
    /// `UINT64`
    Uint64(Vec<u64>),
    /// `INT8`
    Int8(Vec<i8>),
    /// `INT16`
    Int16(Vec<i16>),
    /// `INT32`
    Int32(Vec<i32>),
    /// `INT64`
    Int64(Vec<i64>),
    /// `FP16`, kept as the raw IEEE 754 half-precision bits.
    Fp16(Vec<u16>),
    /// `BF16`, kept as the raw bfloat16 bits.
    Bf16(Vec<u16>),
    /// `FP32`
    Fp32(Vec<f32>),
    /// `FP64`
    Fp64(Vec<f64>),
    /// `BYTES`: each element an arbitrary byte string.
    Bytes(Vec<Vec<u8>>),
}

/// A named, shaped tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Input or output name, e.g. `INPUT0`.
    pub name: String,
    /// KServe v2 datatype name, e.g. `INT32`; [`Tensor::new`] derives it from `data`.
    pub datatype: String,
    /// Shape; its product is the element count.
    pub shape: Vec<i64>,
    /// The elements, row-major.
    pub data: TensorData,
}

impl Tensor {
    /// A tensor whose datatype is taken from its data.
    pub fn new(name: impl Into<String>, shape: Vec<i64>, data: TensorData) -> Self {
        Tensor {
            name: name.into(),
            datatype: data.datatype().to_string(),
            shape,
            data,
        }
    }

    /// Checks that the datatype matches the data and that the shape's product is the
    /// element count (a negative dimension skips the count check).
    pub fn validate(&self) -> Result<(), ClientError> {
        if !self.datatype.eq_ignore_ascii_case(self.data.datatype()) {
            return Err(ClientError::InvalidInput(format!(
                "tensor {}: datatype {} does not match its {} data",
                self.name,
                self.datatype,
                self.data.datatype()
            )));
        }
        if let Some(expected) = element_count(&self.shape) {
            if expected != self.data.len() as u64 {
                return Err(ClientError::InvalidInput(format!(
                    "tensor {}: shape {:?} holds {} elements but {} were given",
                    self.name,
                    self.shape,
                    expected,
                    self.data.len()
                )));
            }
        }
        Ok(())
    }
}

/// The number of elements a shape holds, or `None` if a dimension is negative (variable).
pub fn element_count(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| {
        u64::try_from(d).ok().map(|d| acc.saturating_mul(d))
    })
}

impl TensorData {
    /// The KServe v2 datatype name of this data.
    pub fn datatype(&self) -> &'static str {
        match self {
            TensorData::Bool(_) => "BOOL",
            TensorData::Uint8(_) => "UINT8",
            TensorData::Uint16(_) => "UINT16",
            TensorData::Uint32(_) => "UINT32",
            TensorData::Uint64(_) => "UINT64",
            TensorData::Int8(_) => "INT8",
            TensorData::Int16(_) => "INT16",
            TensorData::Int32(_) => "INT32",
            TensorData::Int64(_) => "INT64",
            TensorData::Fp16(_) => "FP16",
            TensorData::Bf16(_) => "BF16",
            TensorData::Fp32(_) => "FP32",
            TensorData::Fp64(_) => "FP64",
            TensorData::Bytes(_) => "BYTES",
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::Uint8(v) => v.len(),
            TensorData::Uint16(v) | TensorData::Fp16(v) | TensorData::Bf16(v) => v.len(),
            TensorData::Uint32(v) => v.len(),
            TensorData::Uint64(v) => v.len(),
            TensorData::Int8(v) => v.len(),
            TensorData::Int16(v) => v.len(),
            TensorData::Int32(v) => v.len(),
            TensorData::Int64(v) => v.len(),
            TensorData::Fp32(v) => v.len(),
            TensorData::Fp64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes the elements in the raw wire format (little-endian; BYTES length-prefixed).
    pub fn to_raw(&self) -> Vec<u8> {
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(v.len() * N);
            for &x in v {
                out.extend_from_slice(&f(x));
            }
            out
        }
        match self {
            TensorData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
            TensorData::Uint8(v) => v.clone(),
            TensorData::Uint16(v) | TensorData::Fp16(v) | TensorData::Bf16(v) => {
                le(v, u16::to_le_bytes)
            }
            TensorData::Uint32(v) => le(v, u32::to_le_bytes),
            TensorData::Uint64(v) => le(v, u64::to_le_bytes),
            TensorData::Int8(v) => le(v, i8::to_le_bytes),
            TensorData::Int16(v) => le(v, i16::to_le_bytes),
            TensorData::Int32(v) => le(v, i32::to_le_bytes),
            TensorData::Int64(v) => le(v, i64::to_le_bytes),
            TensorData::Fp32(v) => le(v, f32::to_le_bytes),
            TensorData::Fp64(v) => le(v, f64::to_le_bytes),
            TensorData::Bytes(v) => encode_bytes_elements(v),
        }
    }

    /// Decodes raw wire bytes of the given datatype.
    pub fn from_raw(datatype: &str, raw: &[u8]) -> Result<TensorData, ClientError> {
        fn fixed<T, const N: usize>(
            datatype: &str,
            raw: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>, ClientError> {
            if !raw.len().is_multiple_of(N) {
                return Err(ClientError::Protocol(format!(
                    "{datatype} raw contents of {} bytes is not a multiple of {N}",
                    raw.len()
                )));
            }
            Ok(raw
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect())
        }
        let dt = datatype.to_ascii_uppercase();
        Ok(match dt.as_str() {
            "BOOL" => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
            "UINT8" => TensorData::Uint8(raw.to_vec()),
            "UINT16" => TensorData::Uint16(fixed(&dt, raw, u16::from_le_bytes)?),
            "UINT32" => TensorData::Uint32(fixed(&dt, raw, u32::from_le_bytes)?),
            "UINT64" => TensorData::Uint64(fixed(&dt, raw, u64::from_le_bytes)?),
            "INT8" => TensorData::Int8(fixed(&dt, raw, i8::from_le_bytes)?),
            "INT16" => TensorData::Int16(fixed(&dt, raw, i16::from_le_bytes)?),
            "INT32" => TensorData::Int32(fixed(&dt, raw, i32::from_le_bytes)?),
            "INT64" => TensorData::Int64(fixed(&dt, raw, i64::from_le_bytes)?),
            "FP16" => TensorData::Fp16(fixed(&dt, raw, u16::from_le_bytes)?),
            "BF16" => TensorData::Bf16(fixed(&dt, raw, u16::from_le_bytes)?),
            "FP32" => TensorData::Fp32(fixed(&dt, raw, f32::from_le_bytes)?),
            "FP64" => TensorData::Fp64(fixed(&dt, raw, f64::from_le_bytes)?),
            "BYTES" => TensorData::Bytes(decode_bytes_elements(raw)?),
            other => return Err(ClientError::Protocol(format!("unknown datatype {other:?}"))),
        })
    }

    /// Decodes the typed `contents` field of a tensor of the given datatype.
    pub fn from_contents(
        datatype: &str,
        c: &InferTensorContents,
    ) -> Result<TensorData, ClientError> {
        fn narrow<S: Copy, T: TryFrom<S>>(dt: &str, v: &[S]) -> Result<Vec<T>, ClientError> {
            v.iter()
                .map(|&x| {
                    T::try_from(x).map_err(|_| {
                        ClientError::Protocol(format!("{dt} contents hold an out-of-range value"))
                    })
                })
                .collect()
        }
        let dt = datatype.to_ascii_uppercase();
        Ok(match dt.as_str() {
            "BOOL" => TensorData::Bool(c.bool_contents.clone()),
            "UINT8" => TensorData::Uint8(narrow(&dt, &c.uint_contents)?),
            "UINT16" => TensorData::Uint16(narrow(&dt, &c.uint_contents)?),
            "UINT32" => TensorData::Uint32(c.uint_contents.clone()),
            "UINT64" => TensorData::Uint64(c.uint64_contents.clone()),
            "INT8" => TensorData::Int8(narrow(&dt, &c.int_contents)?),
            "INT16" => TensorData::Int16(narrow(&dt, &c.int_contents)?),
            "INT32" => TensorData::Int32(c.int_contents.clone()),
            "INT64" => TensorData::Int64(c.int64_contents.clone()),
            "FP32" => TensorData::Fp32(c.fp32_contents.clone()),
            "FP64" => TensorData::Fp64(c.fp64_contents.clone()),
            "BYTES" => TensorData::Bytes(c.bytes_contents.clone()),
            other => {
                return Err(ClientError::Protocol(format!(
                    "datatype {other} cannot be carried in typed contents"
                )))
            }
        })
    }

    /// Builds data of the given datatype from JSON values (numbers, booleans, strings;
    /// nested arrays are flattened row-major, as in the KServe v2 REST format).
    pub fn from_json(datatype: &str, values: &[Value]) -> Result<TensorData, ClientError> {
        let mut flat = Vec::new();
        flatten_json(values, &mut flat);
        let dt = datatype.to_ascii_uppercase();
        let bad = |v: &Value| ClientError::InvalidInput(format!("{v} is not a valid {dt} value"));
        fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
            match v {
                Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => T::try_from(i).ok(),
                    (None, Some(u)) => T::try_from(u).ok(),
                    _ => None,
                },
                Value::Bool(b) => T::try_from(i64::from(*b)).ok(),
                _ => None,
            }
        }
        fn float(v: &Value) -> Option<f64> {
            match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => match s.to_ascii_lowercase().as_str() {
                    "nan" => Some(f64::NAN),
                    "inf" | "+inf" | "infinity" => Some(f64::INFINITY),
                    "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
                    _ => None,
                },
                _ => None,
            }
        }
        macro_rules! ints {
            ($variant:ident) => {
                TensorData::$variant(
                    flat.iter()
                        .map(|v| int(v).ok_or_else(|| bad(v)))
                        .collect::<Result<_, _>>()?,
                )
            };
        }
        macro_rules! floats {
            ($variant:ident, $conv:expr) => {
                TensorData::$variant(
                    flat.iter()
                        .map(|v| float(v).map($conv).ok_or_else(|| bad(v)))
                        .collect::<Result<_, _>>()?,
                )
            };
        }
        Ok(match dt.as_str() {
            "BOOL" => TensorData::Bool(
                flat.iter()
                    .map(|v| match v {
                        Value::Bool(b) => Ok(*b),
                        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
                        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
                        _ => Err(bad(v)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "UINT8" => ints!(Uint8),
            "UINT16" => ints!(Uint16),
            "UINT32" => ints!(Uint32),
            "UINT64" => ints!(Uint64),
            "INT8" => ints!(Int8),
            "INT16" => ints!(Int16),
            "INT32" => ints!(Int32),
            "INT64" => ints!(Int64),
            "FP16" => floats!(Fp16, |x| f32_to_f16(x as f32)),
            "BF16" => floats!(Bf16, |x| f32_to_bf16(x as f32)),
            "FP32" => floats!(Fp32, |x| x as f32),
            "FP64" => floats!(Fp64, |x| x),
            "BYTES" => TensorData::Bytes(
                flat.iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.as_bytes().to_vec()),
                        Value::Number(n) => Ok(n.to_string().into_bytes()),
                        Value::Bool(b) => Ok(b.to_string().into_bytes()),
                        _ => Err(bad(v)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(ClientError::InvalidInput(format!(
                    "unknown datatype {other:?} (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)"
                )))
            }
        })
    }

    /// The elements as JSON values (FP16/BF16 widened to numbers; BYTES as UTF-8 strings
    /// where they are valid UTF-8, otherwise as arrays of byte values).
    pub fn to_json(&self) -> Vec<Value> {
        fn all<T: Copy + Into<Value>>(v: &[T]) -> Vec<Value> {
            v.iter().map(|&x| x.into()).collect()
        }
        match self {
            TensorData::Bool(v) => all(v),
            TensorData::Uint8(v) => all(v),
            TensorData::Uint16(v) => all(v),
            TensorData::Uint32(v) => all(v),
            TensorData::Uint64(v) => all(v),
            TensorData::Int8(v) => all(v),
            TensorData::Int16(v) => all(v),
            TensorData::Int32(v) => all(v),
            TensorData::Int64(v) => all(v),
            TensorData::Fp16(v) => v.iter().map(|&h| Value::from(f16_to_f32(h))).collect(),
            TensorData::Bf16(v) => v.iter().map(|&h| Value::from(bf16_to_f32(h))).collect(),
            TensorData::Fp32(v) => all(v),
            TensorData::Fp64(v) => all(v),
            TensorData::Bytes(v) => v
                .iter()
                .map(|b| match std::str::from_utf8(b) {
                    Ok(s) => Value::String(s.to_string()),
                    Err(_) => Value::Array(b.iter().map(|&x| Value::from(x)).collect()),
                })
                .collect(),
        }
    }

    /// The elements rendered as short strings, for tables.
    pub fn to_strings(&self) -> Vec<String> {
        match self {
            TensorData::Bytes(v) => v
                .iter()
                .map(|b| match std::str::from_utf8(b) {
                    Ok(s) => format!("{s:?}"),
                    Err(_) => format!("{b:?}"),
                })
                .collect(),
            _ => self.to_json().iter().map(|v| v.to_string()).collect(),
        }
    }
}

fn flatten_json<'a>(values: &'a [Value], out: &mut Vec<&'a Value>) {
    for v in values {
        match v {
            Value::Array(inner) => flatten_json(inner, out),
            other => out.push(other),
        }
    }
}

/// Encodes BYTES elements: for each, a 4-byte little-endian length then the bytes.
pub fn encode_bytes_elements(elements: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = elements.iter().map(|e| 4 + e.len()).sum();
    let mut out = Vec::with_capacity(total);
    for e in elements {
        // An element over 4 GiB cannot be framed; the wire format has no way to say it.
        let len = u32::try_from(e.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// Decodes length-prefixed BYTES elements.
pub fn decode_bytes_elements(mut raw: &[u8]) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(ClientError::Protocol(format!(
                "BYTES element has a truncated length prefix ({} bytes left)",
                raw.len()
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(ClientError::Protocol(format!(
                "BYTES element says {len} bytes but only {} remain",
                rest.len()
            )));
        }
        let (elem, rest) = rest.split_at(len);
        out.push(elem.to_vec());
        raw = rest;
    }
    Ok(out)
}

/// Converts IEEE 754 half-precision bits to `f32`.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => sign * (mant as f32) * 2f32.powi(-24),
        0x1f => {
            if mant == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            }
        }
        _ => {
            let bits = (u32::from(h & 0x8000) << 16) | ((exp + 112) << 23) | (mant << 13);
            f32::from_bits(bits)
        }
    }
}

/// Converts `f32` to IEEE 754 half-precision bits, rounding to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let mant = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // a carry into the exponent is the correct rounding (up to infinity)
    }
    sign | r as u16
}

/// Converts bfloat16 bits to `f32`.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Converts `f32` to bfloat16 bits, rounding to nearest even.
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// Builds a `ModelInferRequest` whose inputs travel as `raw_input_contents`.
///
/// `outputs` names the outputs to request; empty asks for all of them.
pub fn build_request(
    model: &str,
    inputs: &[Tensor],
    outputs: &[String],
) -> Result<ModelInferRequest, ClientError> {
    let mut req = ModelInferRequest {
        model_name: model.to_string(),
        ..Default::default()
    };
    for t in inputs {
        t.validate()?;
        req.inputs.push(InferInputTensor {
            name: t.name.clone(),
            datatype: t.data.datatype().to_string(),
            shape: t.shape.clone(),
            parameters: HashMap::new(),
            contents: None,
        });
        req.raw_input_contents.push(t.data.to_raw());
    }
    req.outputs = outputs
        .iter()
        .map(|name| InferRequestedOutputTensor {
            name: name.clone(),
            parameters: HashMap::new(),
        })
        .collect();
    Ok(req)
}

/// Decodes every output of a response into typed tensors, by each output's datatype.
pub fn decode_outputs(resp: &ModelInferResponse) -> Result<Vec<Tensor>, ClientError> {
    let raw = &resp.raw_output_contents;
    if !raw.is_empty() && raw.len() != resp.outputs.len() {
        return Err(ClientError::Protocol(format!(
            "{} outputs but {} raw_output_contents",
            resp.outputs.len(),
            raw.len()
        )));
    }
    resp.outputs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let data = match raw.get(i) {
                Some(bytes) => TensorData::from_raw(&out.datatype, bytes)?,
                None => match &out.contents {
                    Some(c) => TensorData::from_contents(&out.datatype, c)?,
                    None => TensorData::from_raw(&out.datatype, &[])?,
                },
            };
            Ok(Tensor {
                name: out.name.clone(),
                datatype: out.datatype.clone(),
                shape: out.shape.clone(),
                data,
            })
        })
        .collect()
}

/// Finds one output by name and decodes it.
pub fn decode_output(resp: &ModelInferResponse, name: &str) -> Result<Tensor, ClientError> {
    decode_outputs(resp)?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| ClientError::Protocol(format!("response has no output {name:?}")))
}

/// Converts a JSON value to an inference parameter: booleans, integers (signed, or unsigned
/// above `i64::MAX`), other numbers as doubles, strings.
pub fn json_to_parameter(v: &Value) -> Result<InferParameter, ClientError> {
    use infergate_proto::inference::infer_parameter::ParameterChoice;
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ParameterChoice::Int64Param(i),
            (None, Some(u), _) => ParameterChoice::Uint64Param(u),
            (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
            _ => return Err(ClientError::InvalidInput(format!("bad number {n}"))),
        },
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        other => {
            return Err(ClientError::InvalidInput(format!(
                "parameter value {other} must be a boolean, number or string"
            )))
        }
    };
    Ok(InferParameter {
        parameter_choice: Some(choice),
    })
}

/// Converts an inference parameter to JSON (`null` when unset).
pub fn parameter_to_json(p: &InferParameter) -> Value {
    use infergate_proto::inference::infer_parameter::ParameterChoice;
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::from(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::StringParam(s)) => Value::from(s.clone()),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::model_infer_response::InferOutputTensor;

    #[test]
    fn raw_round_trip_every_fixed_type() {
        let cases = vec![
            TensorData::Bool(vec![true, false, true]),
            TensorData::Uint8(vec![0, 7, 255]),
            TensorData::Uint16(vec![0, 65535]),
            TensorData::Uint32(vec![1, u32::MAX]),
            TensorData::Uint64(vec![u64::MAX, 3]),
            TensorData::Int8(vec![-128, 127]),
            TensorData::Int16(vec![-2, 300]),
            TensorData::Int32(vec![-1, 0, i32::MAX]),
            TensorData::Int64(vec![i64::MIN, 42]),
            TensorData::Fp16(vec![0x3c00, 0xc000]),
            TensorData::Bf16(vec![0x3f80]),
            TensorData::Fp32(vec![1.5, -0.25, f32::MAX]),
            TensorData::Fp64(vec![std::f64::consts::PI]),
            TensorData::Bytes(vec![b"hi".to_vec(), vec![], vec![0, 255]]),
        ];
        for data in cases {
            let raw = data.to_raw();
            let back = TensorData::from_raw(data.datatype(), &raw).expect("decodes");
            assert_eq!(back, data, "{}", data.datatype());
        }
    }

    #[test]
    fn int32_raw_is_little_endian() {
        assert_eq!(
            TensorData::Int32(vec![1, -1]).to_raw(),
            vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            TensorData::Bytes(vec![b"abc".to_vec()]).to_raw(),
            vec![3, 0, 0, 0, b'a', b'b', b'c']
        );
    }

    #[test]
    fn malformed_raw_is_an_error_not_a_panic() {
        assert!(TensorData::from_raw("INT32", &[1, 2, 3]).is_err());
        assert!(TensorData::from_raw("BYTES", &[5, 0, 0, 0, 1]).is_err());
        assert!(TensorData::from_raw("BYTES", &[5, 0]).is_err());
        assert!(TensorData::from_raw("COMPLEX", &[]).is_err());
    }

    #[test]
    fn half_precision_conversions() {
        for &(x, bits) in &[
            (1.0f32, 0x3c00u16),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (0.0, 0),
        ] {
            assert_eq!(f32_to_f16(x), bits, "{x}");
            assert_eq!(f16_to_f32(bits), x);
        }
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        // smallest subnormal
        assert_eq!(f32_to_f16(2f32.powi(-24)), 1);
        assert_eq!(f16_to_f32(1), 2f32.powi(-24));
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn build_request_uses_raw_contents_and_checks_shape() {
        let t = Tensor::new("INPUT0", vec![1, 2], TensorData::Int32(vec![3, 4]));
        let req = build_request("simple", &[t], &["OUTPUT0".to_string()]).expect("valid");
        assert_eq!(req.model_name, "simple");
        assert_eq!(req.inputs[0].datatype, "INT32");
        assert_eq!(req.inputs[0].shape, vec![1, 2]);
        assert_eq!(req.raw_input_contents[0], vec![3, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(req.outputs[0].name, "OUTPUT0");

        let bad = Tensor::new("X", vec![1, 3], TensorData::Int32(vec![3, 4]));
        assert!(build_request("simple", &[bad], &[]).is_err());
        let variable = Tensor::new("X", vec![-1], TensorData::Fp32(vec![1.0; 5]));
        assert!(build_request("identity_fp32", &[variable], &[]).is_ok());
    }

    fn output(name: &str, datatype: &str, shape: Vec<i64>) -> InferOutputTensor {
        InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }
    }

    #[test]
    fn decode_outputs_from_raw_and_from_contents() {
        let resp = ModelInferResponse {
            outputs: vec![output("A", "INT32", vec![2]), output("B", "FP64", vec![1])],
            raw_output_contents: vec![
                TensorData::Int32(vec![5, -6]).to_raw(),
                TensorData::Fp64(vec![0.5]).to_raw(),
            ],
            ..Default::default()
        };
        let outs = decode_outputs(&resp).expect("decodes");
        assert_eq!(outs[0].data, TensorData::Int32(vec![5, -6]));
        assert_eq!(outs[1].data, TensorData::Fp64(vec![0.5]));
        assert_eq!(decode_output(&resp, "B").expect("present").shape, vec![1]);
        assert!(decode_output(&resp, "C").is_err());

        let mut typed = output("T", "UINT8", vec![2]);
        typed.contents = Some(InferTensorContents {
            uint_contents: vec![1, 200],
            ..Default::default()
        });
        let resp = ModelInferResponse {
            outputs: vec![typed],
            ..Default::default()
        };
        assert_eq!(
            decode_outputs(&resp).expect("decodes")[0].data,
            TensorData::Uint8(vec![1, 200])
        );
    }

    #[test]
    fn json_values_convert_by_datatype() {
        let v: Vec<Value> = serde_json::from_str("[[1, 2], [3, 4]]").expect("json");
        assert_eq!(
            TensorData::from_json("INT64", &v).expect("ints"),
            TensorData::Int64(vec![1, 2, 3, 4])
        );
        assert_eq!(
            TensorData::from_json("fp32", &v).expect("floats"),
            TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0])
        );
        let v: Vec<Value> = serde_json::from_str("[300]").expect("json");
        assert!(TensorData::from_json("UINT8", &v).is_err());
        let v: Vec<Value> = serde_json::from_str(r#"["a", "bc"]"#).expect("json");
        let bytes = TensorData::from_json("BYTES", &v).expect("bytes");
        assert_eq!(
            bytes,
            TensorData::Bytes(vec![b"a".to_vec(), b"bc".to_vec()])
        );
        assert_eq!(bytes.to_json(), v);
        let v: Vec<Value> = serde_json::from_str("[true, 0]").expect("json");
        assert_eq!(
            TensorData::from_json("BOOL", &v).expect("bools"),
            TensorData::Bool(vec![true, false])
        );
        assert!(TensorData::from_json("INT32", &[Value::from(1.5)]).is_err());
    }

    #[test]
    fn parameters_convert_both_ways() {
        for v in [
            Value::from(true),
            Value::from(-3),
            Value::from(u64::MAX),
            Value::from(0.5),
            Value::from("x"),
        ] {
            let p = json_to_parameter(&v).expect("scalar");
            assert_eq!(parameter_to_json(&p), v);
        }
        assert!(json_to_parameter(&Value::Null).is_err());
    }
}
