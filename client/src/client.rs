//! `Client`: a typed KServe v2 gRPC client over one tonic `Channel`, with headers added to
//! every call.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use infergate_proto::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient, infer_parameter::ParameterChoice,
    repository_index_response::ModelIndex, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelStreamInferResponse,
    RepositoryIndexRequest, ServerLiveRequest, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest,
};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::tensor::{decode_output, Tensor, TensorData};
use crate::ClientError;

/// The most bytes one message may have, in either direction (the gateway carries 64 MiB
/// tensors; tonic's own default is 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The name of the parameter Triton sets on the last response of a decoupled stream.
pub const FINAL_RESPONSE_PARAM: &str = "triton_final_response";

/// A KServe v2 client bound to one gateway (or backend) address.
///
/// Cloning is cheap: clones share the HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    timeout: Option<Duration>,
}

/// Turns `127.0.0.1:8001` or `http://host:port` into an endpoint URI string.
pub fn endpoint_uri(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Builds a tonic `Endpoint` for an address, with the settings the client uses everywhere.
pub fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let uri = endpoint_uri(addr);
    Endpoint::from_shared(uri.clone())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_adaptive_window(true)
        })
        .map_err(|e| ClientError::InvalidAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

/// Opens one HTTP/2 connection to `addr`.
pub async fn connect_channel(addr: &str) -> Result<Channel, ClientError> {
    let ep = endpoint(addr)?;
    ep.connect().await.map_err(|source| ClientError::Connect {
        addr: ep.uri().to_string(),
        source,
    })
}

/// Parses one metadata header, rejecting keys and values gRPC cannot carry as text.
pub fn parse_header(
    key: &str,
    value: &str,
) -> Result<(AsciiMetadataKey, AsciiMetadataValue), ClientError> {
    let k: AsciiMetadataKey = key
        .to_ascii_lowercase()
        .parse()
        .map_err(|_| ClientError::InvalidInput(format!("{key:?} is not a valid header name")))?;
    if key.to_ascii_lowercase().ends_with("-bin") {
        return Err(ClientError::InvalidInput(format!(
            "{key:?}: binary (-bin) headers are not supported"
        )));
    }
    let v: AsciiMetadataValue = value.parse().map_err(|_| {
        ClientError::InvalidInput(format!("{value:?} is not a valid value for header {key}"))
    })?;
    Ok((k, v))
}

impl Client {
    /// Connects to `addr` (`127.0.0.1:8001` or `http://host:8001`).
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Ok(Client::from_channel(connect_channel(addr).await?))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            channel,
            headers: Vec::new(),
            timeout: None,
        }
    }

    /// Adds a metadata header (e.g. `authorization`, `x-tenant`) to every call made by this
    /// client.
    pub fn with_header(mut self, key: &str, value: &str) -> Result<Client, ClientError> {
        self.headers.push(parse_header(key, value)?);
        Ok(self)
    }

    /// Sets a deadline (sent as `grpc-timeout`) on every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Wraps a message in a request carrying this client's headers and deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        for (k, v) in &self.headers {
            req.metadata_mut().append(k.clone(), v.clone());
        }
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        req
    }

    /// The generated KServe v2 stub on this client's channel.
    pub fn inference(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// `ServerLive`.
    pub async fn live(&self) -> Result<bool, ClientError> {
        let r = self
            .inference()
            .server_live(self.request(ServerLiveRequest {}))
            .await?;
        Ok(r.into_inner().live)
    }

    /// `ServerReady`.
    pub async fn ready(&self) -> Result<bool, ClientError> {
        let r = self
            .inference()
            .server_ready(self.request(ServerReadyRequest {}))
            .await?;
        Ok(r.into_inner().ready)
    }

    /// `ModelReady` for the default version of `name`.
    pub async fn model_ready(&self, name: &str) -> Result<bool, ClientError> {
        let r = self
            .inference()
            .model_ready(self.request(ModelReadyRequest {
                name: name.to_string(),
                version: String::new(),
            }))
            .await?;
        Ok(r.into_inner().ready)
    }

    /// `ServerMetadata`.
    pub async fn server_metadata(&self) -> Result<ServerMetadataResponse, ClientError> {
        let r = self
            .inference()
            .server_metadata(self.request(ServerMetadataRequest {}))
            .await?;
        Ok(r.into_inner())
    }

    /// `ModelMetadata` for the default version of `name`.
    pub async fn model_metadata(&self, name: &str) -> Result<ModelMetadataResponse, ClientError> {
        let r = self
            .inference()
            .model_metadata(self.request(ModelMetadataRequest {
                name: name.to_string(),
                version: String::new(),
            }))
            .await?;
        Ok(r.into_inner())
    }

    /// `RepositoryIndex`: every model the server knows, ready or not.
    pub async fn repository_index(&self) -> Result<Vec<ModelIndex>, ClientError> {
        let r = self
            .inference()
            .repository_index(self.request(RepositoryIndexRequest {
                repository_name: String::new(),
                ready: false,
            }))
            .await?;
        Ok(r.into_inner().models)
    }

    /// `grpc.health.v1.Health/Check` for `service` ("" is the whole server); returns the
    /// status name (`SERVING`, `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`).
    pub async fn health(&self, service: &str) -> Result<String, ClientError> {
        let mut h = HealthClient::new(self.channel.clone());
        let r = h
            .check(self.request(HealthCheckRequest {
                service: service.to_string(),
            }))
            .await?;
        let status = r.into_inner().status();
        Ok(status.as_str_name().to_string())
    }

    /// `ModelInfer`.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, ClientError> {
        Ok(self.infer_full(request).await?.into_inner())
    }

    /// `ModelInfer`, keeping the response metadata (headers and trailers, e.g. `sim-name`).
    pub async fn infer_full(
        &self,
        request: ModelInferRequest,
    ) -> Result<tonic::Response<ModelInferResponse>, ClientError> {
        Ok(self.inference().model_infer(self.request(request)).await?)
    }

    /// `ModelInfer` with a pre-encoded `ModelInferRequest`; the answer stays encoded.
    pub async fn infer_raw(&self, body: Bytes) -> Result<tonic::Response<Bytes>, ClientError> {
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static(crate::raw::MODEL_INFER_PATH);
        Ok(crate::raw::unary_raw(self.channel.clone(), path, self.request(body)).await?)
    }

    /// Calls the `simple` model: returns (OUTPUT0 = a + b, OUTPUT1 = a - b).
    pub async fn infer_simple(
        &self,
        a: [i32; 16],
        b: [i32; 16],
    ) -> Result<(Vec<i32>, Vec<i32>), ClientError> {
        let req = crate::tensor::build_request(
            "simple",
            &[
                Tensor::new("INPUT0", vec![1, 16], TensorData::Int32(a.to_vec())),
                Tensor::new("INPUT1", vec![1, 16], TensorData::Int32(b.to_vec())),
            ],
            &[],
        )?;
        let resp = self.infer(req).await?;
        let int32 = |name: &str| -> Result<Vec<i32>, ClientError> {
            match decode_output(&resp, name)?.data {
                TensorData::Int32(v) => Ok(v),
                other => Err(ClientError::Protocol(format!(
                    "{name} is {}, expected INT32",
                    other.datatype()
                ))),
            }
        };
        Ok((int32("OUTPUT0")?, int32("OUTPUT1")?))
    }

    /// Streams `max_tokens` tokens from the decoupled `tiny_llm` model and returns them.
    pub async fn generate(
        &self,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<Vec<String>, ClientError> {
        self.generate_with("tiny_llm", prompt, max_tokens, |_| {})
            .await
    }

    /// Like [`Client::generate`] for any decoupled text model, calling `on_token` as each
    /// token arrives.
    pub async fn generate_with(
        &self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
        mut on_token: impl FnMut(&str),
    ) -> Result<Vec<String>, ClientError> {
        let request = generate_request(model, prompt, max_tokens)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<ModelInferRequest>(1);
        tx.send(request)
            .await
            .map_err(|_| ClientError::Protocol("request stream closed early".into()))?;
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut stream = self
            .inference()
            .model_stream_infer(self.request(outbound))
            .await?
            .into_inner();
        let mut tokens = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            let (token, last) = read_stream_response(&msg)?;
            if let Some(t) = token {
                on_token(&t);
                tokens.push(t);
            }
            if last {
                break;
            }
        }
        // Half-close our side only after the server said it is done.
        drop(tx);
        Ok(tokens)
    }
}

/// The request `generate` sends: BYTES `text_input` [1] and INT32 `max_tokens` [1].
pub fn generate_request(
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> Result<ModelInferRequest, ClientError> {
    let max_tokens = i32::try_from(max_tokens)
        .map_err(|_| ClientError::InvalidInput(format!("max_tokens {max_tokens} is too large")))?;
    crate::tensor::build_request(
        model,
        &[
            Tensor::new(
                "text_input",
                vec![1],
                TensorData::Bytes(vec![prompt.as_bytes().to_vec()]),
            ),
            Tensor::new("max_tokens", vec![1], TensorData::Int32(vec![max_tokens])),
        ],
        &[],
    )
}

/// Reads one decoupled-stream message: its `text_output` token (if any) and whether it is the
/// final response. An `error_message` becomes an error.
pub fn read_stream_response(
    msg: &ModelStreamInferResponse,
) -> Result<(Option<String>, bool), ClientError> {
    if !msg.error_message.is_empty() {
        return Err(ClientError::Stream(msg.error_message.clone()));
    }
    let Some(resp) = &msg.infer_response else {
        return Ok((None, false));
    };
    let last = matches!(
        resp.parameters
            .get(FINAL_RESPONSE_PARAM)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    let token = if resp.outputs.iter().any(|o| o.name == "text_output") {
        match decode_output(resp, "text_output")?.data {
            TensorData::Bytes(elems) => Some(
                elems
                    .iter()
                    .map(|e| String::from_utf8_lossy(e).into_owned())
                    .collect::<String>(),
            ),
            other => {
                return Err(ClientError::Protocol(format!(
                    "text_output is {}, expected BYTES",
                    other.datatype()
                )))
            }
        }
    } else {
        None
    };
    Ok((token, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::{model_infer_response::InferOutputTensor, InferParameter};

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(endpoint_uri("127.0.0.1:8001"), "http://127.0.0.1:8001");
        assert_eq!(endpoint_uri("https://gw:443"), "https://gw:443");
        assert!(endpoint("127.0.0.1:8001").is_ok());
        assert!(endpoint("not a uri").is_err());
    }

    #[test]
    fn headers_are_validated() {
        assert!(parse_header("x-tenant", "blue").is_ok());
        assert!(parse_header("Authorization", "Bearer k").is_ok());
        assert!(parse_header("bad key", "v").is_err());
        assert!(parse_header("k", "line\nbreak").is_err());
        assert!(parse_header("trace-bin", "v").is_err());
    }

    #[test]
    fn stream_responses_yield_tokens_and_the_final_flag() {
        let mut resp = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "text_output".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                ..Default::default()
            }],
            raw_output_contents: vec![TensorData::Bytes(vec![b" tok".to_vec()]).to_raw()],
            ..Default::default()
        };
        let msg = ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(resp.clone()),
        };
        assert_eq!(
            read_stream_response(&msg).expect("valid"),
            (Some(" tok".to_string()), false)
        );
        resp.parameters.insert(
            FINAL_RESPONSE_PARAM.into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(true)),
            },
        );
        let msg = ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(resp),
        };
        assert!(read_stream_response(&msg).expect("valid").1);
        let msg = ModelStreamInferResponse {
            error_message: "boom".into(),
            infer_response: None,
        };
        assert!(matches!(read_stream_response(&msg), Err(ClientError::Stream(m)) if m == "boom"));
    }

    #[test]
    fn generate_request_encodes_prompt_as_raw_bytes() {
        let req = generate_request("tiny_llm", "hi", 3).expect("valid");
        assert_eq!(req.inputs[0].name, "text_input");
        assert_eq!(req.raw_input_contents[0], vec![2, 0, 0, 0, b'h', b'i']);
        assert_eq!(req.raw_input_contents[1], vec![3, 0, 0, 0]);
    }
}
