//! `Client`: a typed KServe v2 gRPC client over one tonic `Channel`, with headers added to
//! every call.

use std::path::PathBuf;
use std::sync::OnceLock;
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
use crate::trace::{ClientSpan, Peer, HEALTH, KSERVE};
use crate::ClientError;

/// The most bytes one message may have, in either direction (the gateway carries 64 MiB
/// tensors; tonic's own default is 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The name of the parameter Triton sets on the last response of a decoupled stream.
pub const FINAL_RESPONSE_PARAM: &str = "triton_final_response";

/// A KServe v2 client bound to one gateway (or backend) address.
///
/// Cloning is cheap: clones share the HTTP/2 connection. Each call starts a CLIENT span
/// and sends its `traceparent` when a tracer provider is installed (see [`crate::trace`]).
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    timeout: Option<Duration>,
    peer: Option<Peer>,
}

/// TLS toward the server: the CA its certificate must chain to (default: the system's
/// bundle), a client certificate and key to show when it asks, and the name to check
/// (default: the address's host).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry.
    pub server_name: Option<String>,
}

static TLS: OnceLock<TlsOptions> = OnceLock::new();

/// Makes every connection this process opens afterwards use TLS with `options`
/// (`infergate-cli --tls-ca ...`); the first call wins. Without it, an `https://`
/// address alone turns TLS on, trusting the system's CAs.
pub fn use_tls(options: TlsOptions) {
    let _ = TLS.set(options);
}

fn tls_for(addr: &str) -> Option<TlsOptions> {
    TLS.get().cloned().or_else(|| {
        addr.trim()
            .starts_with("https://")
            .then(TlsOptions::default)
    })
}

/// Turns `127.0.0.1:8001` or `http://host:port` into an endpoint URI string (`https://`
/// when TLS is on, see [`use_tls`]).
pub fn endpoint_uri(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else if TLS.get().is_some() {
        format!("https://{addr}")
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

/// Opens one HTTP/2 connection to `addr`, over TLS when it is on (see [`use_tls`]).
pub async fn connect_channel(addr: &str) -> Result<Channel, ClientError> {
    let ep = endpoint(addr)?;
    let connected = match tls_for(addr) {
        None => ep.connect().await,
        Some(tls) => {
            let uri = ep.uri();
            let (host, port) = (
                uri.host().unwrap_or_default(),
                uri.port_u16().unwrap_or(443),
            );
            let ca = tls
                .ca
                .clone()
                .unwrap_or_else(|| PathBuf::from(infergate_base::tls::SYSTEM_CA_BUNDLE));
            let identity = tls.cert.as_deref().zip(tls.key.as_deref());
            let config = infergate_base::tls::client_config(&ca, identity)
                .map_err(|e| ClientError::InvalidInput(format!("TLS: {e}")))?;
            let name = tls
                .server_name
                .as_deref()
                .unwrap_or(host.trim_matches(['[', ']']));
            let connector =
                infergate_base::tls::Connector::new(config, name, &format!("{host}:{port}"))
                    .map_err(|e| {
                        ClientError::InvalidInput(format!("TLS: --tls-server-name: {e}"))
                    })?;
            ep.connect_with_connector(connector).await
        }
    };
    connected.map_err(|source| ClientError::Connect {
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
        let peer = endpoint(addr).ok().and_then(|e| Peer::from_uri(e.uri()));
        let mut client = Client::from_channel(connect_channel(addr).await?);
        client.peer = peer;
        Ok(client)
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            channel,
            headers: Vec::new(),
            timeout: None,
            peer: None,
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

    /// [`Client::request`] plus the call's CLIENT span, already injected into it.
    fn traced<T>(
        &self,
        service: &'static str,
        method: &'static str,
        message: T,
    ) -> (tonic::Request<T>, ClientSpan) {
        let mut req = self.request(message);
        let span = ClientSpan::start(service, method, self.peer.as_ref(), req.metadata());
        span.inject(req.metadata_mut());
        (req, span)
    }

    /// The generated KServe v2 stub on this client's channel.
    pub fn inference(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// `ServerLive`.
    pub async fn live(&self) -> Result<bool, ClientError> {
        let (req, span) = self.traced(KSERVE, "ServerLive", ServerLiveRequest {});
        let r = self.inference().server_live(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner().live)
    }

    /// `ServerReady`.
    pub async fn ready(&self) -> Result<bool, ClientError> {
        let (req, span) = self.traced(KSERVE, "ServerReady", ServerReadyRequest {});
        let r = self.inference().server_ready(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner().ready)
    }

    /// `ModelReady` for the default version of `name`.
    pub async fn model_ready(&self, name: &str) -> Result<bool, ClientError> {
        let (req, span) = self.traced(
            KSERVE,
            "ModelReady",
            ModelReadyRequest {
                name: name.to_string(),
                version: String::new(),
            },
        );
        let r = self.inference().model_ready(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner().ready)
    }

    /// `ServerMetadata`.
    pub async fn server_metadata(&self) -> Result<ServerMetadataResponse, ClientError> {
        let (req, span) = self.traced(KSERVE, "ServerMetadata", ServerMetadataRequest {});
        let r = self.inference().server_metadata(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner())
    }

    /// `ModelMetadata` for the default version of `name`.
    pub async fn model_metadata(&self, name: &str) -> Result<ModelMetadataResponse, ClientError> {
        let (req, span) = self.traced(
            KSERVE,
            "ModelMetadata",
            ModelMetadataRequest {
                name: name.to_string(),
                version: String::new(),
            },
        );
        let r = self.inference().model_metadata(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner())
    }

    /// `RepositoryIndex`: every model the server knows, ready or not.
    pub async fn repository_index(&self) -> Result<Vec<ModelIndex>, ClientError> {
        let (req, span) = self.traced(
            KSERVE,
            "RepositoryIndex",
            RepositoryIndexRequest {
                repository_name: String::new(),
                ready: false,
            },
        );
        let r = self.inference().repository_index(req).await;
        span.end_with(&r);
        let r = r?;
        Ok(r.into_inner().models)
    }

    /// `grpc.health.v1.Health/Check` for `service` ("" is the whole server); returns the
    /// status name (`SERVING`, `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`).
    pub async fn health(&self, service: &str) -> Result<String, ClientError> {
        let mut h = HealthClient::new(self.channel.clone());
        let (req, span) = self.traced(
            HEALTH,
            "Check",
            HealthCheckRequest {
                service: service.to_string(),
            },
        );
        let r = h.check(req).await;
        span.end_with(&r);
        let r = r?;
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
        let (req, span) = self.traced(KSERVE, "ModelInfer", request);
        let r = self.inference().model_infer(req).await;
        span.end_with(&r);
        Ok(r?)
    }

    /// `ModelInfer` with a pre-encoded `ModelInferRequest`; the answer stays encoded.
    pub async fn infer_raw(&self, body: Bytes) -> Result<tonic::Response<Bytes>, ClientError> {
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static(crate::raw::MODEL_INFER_PATH);
        let (req, span) = self.traced(KSERVE, "ModelInfer", body);
        let r = crate::raw::unary_raw(self.channel.clone(), path, req).await;
        span.end_with(&r);
        Ok(r?)
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
        // One span for the whole stream, ended when the last token is in.
        let (req, span) = self.traced(KSERVE, "ModelStreamInfer", outbound);
        let result = async {
            let mut stream = self.inference().model_stream_infer(req).await?.into_inner();
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
            Ok::<_, ClientError>(tokens)
        }
        .await;
        match &result {
            Ok(_) => span.end(tonic::Code::Ok, ""),
            Err(ClientError::Rpc(status)) => span.end(status.code(), status.message()),
            Err(e) => span.end(tonic::Code::Unknown, &e.to_string()),
        }
        // Half-close our side only after the server said it is done.
        drop(tx);
        result
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
