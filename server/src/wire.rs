//! gRPC message framing and protobuf peeking: how the gateway reads the few fields it
//! routes on (model name, version, id) straight from the request bytes.
//!
//! The gateway never decodes tensors. A request body is cut into length-prefixed gRPC
//! messages ([`Deframer`]), and each message is walked at its top level only
//! ([`peek_route`]): length-delimited fields are skipped by their length, so the cost is
//! one pass over the field headers, not over the payload. A message that arrives in a
//! single HTTP/2 DATA frame is sliced without copying; one split across frames is copied
//! into a buffer that grows with the bytes that arrive (never past the length prefix,
//! and never sized from the prefix alone: a prefix costs nothing until its bytes come).
//! Those buffered bytes are charged to [`Budget`]s, one for the process and one for the
//! connection, so a flood of messages that never complete is refused, not held.

use bytes::{Buf, Bytes, BytesMut};
use infergate_base::text::shown;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Size of the gRPC length-prefixed message header: compressed flag + u32 length.
pub const HEADER_LEN: usize = 5;

/// One gRPC message, still framed exactly as it came (header and payload), so it can be
/// forwarded as it is.
#[derive(Clone, Debug)]
pub struct Message {
    framed: Bytes,
}

impl Message {
    /// Frames `payload` as an uncompressed gRPC message (one copy; used only for the
    /// gateway's own small messages).
    pub fn encode(payload: &[u8]) -> Self {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&[0]);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        Message {
            framed: buf.freeze(),
        }
    }

    /// Whether the sender compressed the payload (`grpc-encoding`).
    pub fn compressed(&self) -> bool {
        self.framed.first().is_some_and(|flag| *flag != 0)
    }

    /// The protobuf payload.
    pub fn payload(&self) -> Bytes {
        self.framed.slice(HEADER_LEN..)
    }

    /// Header and payload, ready to forward.
    pub fn framed(&self) -> Bytes {
        self.framed.clone()
    }

    /// Bytes on the wire, header included.
    pub fn wire_len(&self) -> usize {
        self.framed.len()
    }
}

/// Why a request body could not be cut into messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the configured limit.
    TooLarge { len: usize, limit: usize },
    /// The compressed flag is neither 0 nor 1.
    BadFlag(u8),
    /// The body ended inside a message.
    Truncated { have: usize, want: usize },
    /// Buffering more of an incomplete message would overdraw `budget` (the config
    /// field that sets it), whose limit is `limit` bytes.
    OverBudget { budget: &'static str, limit: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, limit } => write!(
                f,
                "message of {len} bytes exceeds the gateway's limit of {limit} bytes (max_message_bytes)"
            ),
            FrameError::BadFlag(flag) => {
                write!(f, "malformed gRPC frame: compressed flag is {flag}, not 0 or 1")
            }
            FrameError::Truncated { have, want } => write!(
                f,
                "request body ended inside a message: {have} of {want} bytes received"
            ),
            FrameError::OverBudget { budget, limit } => write!(
                f,
                "the gateway's buffers for requests still arriving are full ({budget} = {limit} bytes); try again later"
            ),
        }
    }
}

/// The process-wide budget's default: `max_buffered_request_bytes`.
pub const DEFAULT_BUFFERED_REQUEST_BYTES: usize = 256 << 20;

/// A budget of request bytes held in buffers while their messages are incomplete,
/// shared by every [`Deframer`] that charges it: the whole process has one
/// ([`process_budget`]), and so does each client connection. A deframer charges the
/// capacity it allocates before it allocates it, and gives it back when the message is
/// complete (it then belongs to the call) or when the deframer is dropped.
#[derive(Debug)]
pub struct Budget {
    name: &'static str,
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes; `name` is the config field that sets it, for errors.
    pub const fn new(name: &'static str, limit: usize) -> Self {
        Budget {
            name,
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        }
    }

    /// The config field that sets this budget.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Bytes that may be held at once.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit; bytes already held stay charged.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> Result<(), FrameError> {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map(|_| ())
            .map_err(|_| FrameError::OverBudget {
                budget: self.name,
                limit,
            })
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

static PROCESS_BUDGET: Budget =
    Budget::new("max_buffered_request_bytes", DEFAULT_BUFFERED_REQUEST_BYTES);

/// The process-wide budget of buffered request bytes (`max_buffered_request_bytes`;
/// the server sets its limit when it starts). Every deframer charges it.
pub fn process_budget() -> &'static Budget {
    &PROCESS_BUDGET
}

/// What the server knows about the connection a request arrived on, for the code that
/// reads the request: set around each call's future by the server
/// ([`RequestLimits::scope`]) and read where a request body is read
/// ([`RequestLimits::current`]), so the request path needs no extra arguments.
#[derive(Debug, Clone, Default)]
pub struct RequestLimits {
    /// The connection's budget of buffered request bytes, charged besides the process's.
    pub connection: Option<Arc<Budget>>,
    /// How long a unary request body may take to arrive (`request_read_timeout_ms`).
    pub read_timeout: Option<Duration>,
}

tokio::task_local! {
    static LIMITS: RequestLimits;
}

impl RequestLimits {
    /// The limits of the call being served on this task; the default (no connection
    /// budget, no read timeout) outside one, e.g. in a task the call spawned.
    pub fn current() -> RequestLimits {
        LIMITS.try_with(Clone::clone).unwrap_or_default()
    }

    /// Runs `future` with these limits as [`RequestLimits::current`].
    pub fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        LIMITS.scope(self, future)
    }
}

/// The first buffer of a message split across chunks holds at least this much (or the
/// whole message, when smaller), so that tiny chunks do not reallocate at every step.
const MIN_BUFFER: usize = 256;

/// Cuts a stream of body chunks into gRPC messages, checking each length prefix against
/// the size limit before any of the payload is buffered.
///
/// A message split across chunks is gathered in a buffer that grows as its bytes
/// arrive: at most to twice what it holds (or what it holds plus the new chunk), never
/// past the message's end. Its capacity is charged to the budgets first; a charge that
/// does not fit fails the push with [`FrameError::OverBudget`].
#[derive(Debug)]
pub struct Deframer {
    /// The incomplete message, header first.
    buf: Vec<u8>,
    /// Its framed length (header included), once its header is in.
    want: Option<usize>,
    limit: usize,
    process: &'static Budget,
    connection: Option<Arc<Budget>>,
    /// Bytes of `buf`'s capacity charged to the budgets.
    charged: usize,
}

impl Deframer {
    /// A deframer that refuses messages larger than `limit` bytes, charging the
    /// process's budget and the current call's connection budget ([`RequestLimits`]).
    pub fn new(limit: usize) -> Self {
        Deframer::with_budgets(limit, process_budget(), RequestLimits::current().connection)
    }

    /// A deframer that charges `process` and, when given, `connection`.
    pub fn with_budgets(
        limit: usize,
        process: &'static Budget,
        connection: Option<Arc<Budget>>,
    ) -> Self {
        Deframer {
            buf: Vec::new(),
            want: None,
            limit,
            process,
            connection,
            charged: 0,
        }
    }

    /// Feeds one body chunk and appends every message it completes to `out`.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Message>) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.buf.is_empty() {
                // Fast path: whole messages inside this chunk are sliced, not copied.
                while let Some(want) = self.complete_len(&chunk)? {
                    out.push(Message {
                        framed: chunk.split_to(want),
                    });
                }
                if chunk.is_empty() {
                    break;
                }
                // A message that goes on in later chunks: its header (when it is here)
                // is checked before any of it is kept.
                self.want = self.header_len(&chunk)?;
            }
            let target = self.want.unwrap_or(HEADER_LEN);
            let take = (target - self.buf.len()).min(chunk.len());
            self.append(&chunk[..take], target)?;
            chunk.advance(take);
            if self.want.is_none() && self.buf.len() == HEADER_LEN {
                self.want = Some(self.check_header(&self.buf)?);
            }
            if self.want == Some(self.buf.len()) {
                let framed = Bytes::from(std::mem::take(&mut self.buf));
                self.want = None;
                self.release();
                out.push(Message { framed });
            }
        }
        Ok(())
    }

    /// Called at end of body: fails if a message was left incomplete.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want: self.want.unwrap_or(HEADER_LEN),
        })
    }

    /// Bytes of buffer this deframer holds (and has charged to its budgets).
    pub fn buffered(&self) -> usize {
        self.charged
    }

    /// Bytes of the incomplete message received so far (header included).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Appends `bytes` to the incomplete message, whose framed length is `target` (the
    /// header's length while the header is not in yet).
    fn append(&mut self, bytes: &[u8], target: usize) -> Result<(), FrameError> {
        let need = self.buf.len() + bytes.len();
        if need > self.buf.capacity() {
            let capacity = need
                .max(self.buf.capacity().saturating_mul(2))
                .max(MIN_BUFFER)
                .min(target.max(need));
            self.charge(capacity.saturating_sub(self.charged))?;
            self.buf.reserve_exact(capacity - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn charge(&mut self, bytes: usize) -> Result<(), FrameError> {
        if let Some(connection) = &self.connection {
            connection.take(bytes)?;
        }
        if let Err(e) = self.process.take(bytes) {
            if let Some(connection) = &self.connection {
                connection.give_back(bytes);
            }
            return Err(e);
        }
        self.charged += bytes;
        Ok(())
    }

    fn release(&mut self) {
        if self.charged > 0 {
            self.process.give_back(self.charged);
            if let Some(connection) = &self.connection {
                connection.give_back(self.charged);
            }
            self.charged = 0;
        }
    }

    fn check_header(&self, bytes: &[u8]) -> Result<usize, FrameError> {
        let flag = bytes[0];
        if flag > 1 {
            return Err(FrameError::BadFlag(flag));
        }
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        Ok(HEADER_LEN + len)
    }

    fn header_len(&self, bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Ok(None);
        }
        self.check_header(bytes).map(Some)
    }

    fn complete_len(&self, bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        Ok(self.header_len(bytes)?.filter(|want| bytes.len() >= *want))
    }
}

impl Drop for Deframer {
    fn drop(&mut self) {
        self.release();
    }
}

/// The fields of a request the gateway routes on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteKey {
    /// `model_name` (ModelInferRequest) or `name` (metadata, config, statistics).
    pub model: String,
    /// `model_version` / `version`; empty means the backend's choice.
    pub version: String,
    /// `id` (ModelInferRequest only); echoed in errors so callers can match them.
    pub id: String,
    /// Triton's sequence parameters (ModelInferRequest only), when it carries a
    /// `sequence_id`.
    pub sequence: Option<SequenceKey>,
}

/// A sequence id as Triton takes it: an unsigned integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SequenceId {
    /// `sequence_id` given as int64 or uint64.
    Int(u64),
    /// `sequence_id` given as a string.
    Text(String),
}

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SequenceId::Int(v) => write!(f, "{v}"),
            SequenceId::Text(s) => write!(f, "'{}'", shown(s)),
        }
    }
}

/// The sequence parameters of one request: `sequence_id`, `sequence_start`,
/// `sequence_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceKey {
    /// The sequence.
    pub id: SequenceId,
    /// `sequence_start`: the first request of the sequence.
    pub start: bool,
    /// `sequence_end`: the last request of the sequence.
    pub end: bool,
}

/// Why a payload is not a well-formed protobuf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekError(pub String);

impl fmt::Display for PeekError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads fields 1 (model name), 2 (version) and, when `with_id`, 3 (id) from a protobuf
/// payload, walking every top-level field so that a malformed message is caught here
/// rather than by the backend. Those field numbers are the same in `ModelInferRequest`,
/// `ModelMetadataRequest`, `ModelConfigRequest` and `ModelStatisticsRequest`.
///
/// With `with_id`, the `parameters` entries `sequence_id` (int64, uint64 or string; 0
/// and "" mean none, as in Triton), `sequence_start` and `sequence_end` (bools) are read
/// into [`RouteKey::sequence`]; tensors are still only skipped.
pub fn peek_route(mut payload: &[u8], with_id: bool) -> Result<RouteKey, PeekError> {
    let mut key = RouteKey::default();
    let mut counts = [0usize; 3];
    let mut seq = SequenceParams::default();
    while payload.has_remaining() {
        let tag = read_varint(&mut payload)
            .ok_or_else(|| PeekError("malformed protobuf: truncated field tag".into()))?;
        let field = tag >> 3;
        let wire_type = (tag & 7) as u8;
        if field == 0 {
            return Err(PeekError("malformed protobuf: field number 0".into()));
        }
        match wire_type {
            0 => {
                read_varint(&mut payload).ok_or_else(|| {
                    PeekError(format!(
                        "malformed protobuf: truncated varint in field {field}"
                    ))
                })?;
            }
            1 | 5 => {
                let width = if wire_type == 1 { 8 } else { 4 };
                if payload.remaining() < width {
                    return Err(PeekError(format!(
                        "malformed protobuf: truncated fixed-width field {field}"
                    )));
                }
                payload.advance(width);
            }
            2 => {
                let len = read_varint(&mut payload).ok_or_else(|| {
                    PeekError(format!(
                        "malformed protobuf: truncated length of field {field}"
                    ))
                })? as usize;
                if payload.remaining() < len {
                    return Err(PeekError(format!(
                        "malformed protobuf: field {field} announces {len} bytes, {} remain",
                        payload.remaining()
                    )));
                }
                let value = &payload[..len];
                if with_id {
                    // ModelInferRequest: its nested messages must parse too, so a
                    // request the backend cannot decode is refused here, as the
                    // caller's mistake, and never reaches (or counts against) a backend.
                    let nested = match field {
                        4 => Some(("parameters", &mut counts[0])),
                        5 => Some(("inputs", &mut counts[1])),
                        6 => Some(("outputs", &mut counts[2])),
                        _ => None,
                    };
                    if let Some((name, count)) = nested {
                        check_message(value).map_err(|e| {
                            PeekError(format!("malformed protobuf: {name}[{count}]: {e}"))
                        })?;
                        *count += 1;
                    }
                    if field == 4 {
                        seq.read(value)?;
                    }
                }
                let slot = match field {
                    1 => Some(&mut key.model),
                    2 => Some(&mut key.version),
                    3 if with_id => Some(&mut key.id),
                    _ => None,
                };
                if let Some(slot) = slot {
                    *slot = std::str::from_utf8(value)
                        .map_err(|_| {
                            PeekError(format!("malformed protobuf: field {field} is not UTF-8"))
                        })?
                        .to_owned();
                }
                payload.advance(len);
            }
            other => {
                return Err(PeekError(format!(
                    "malformed protobuf: field {field} has unsupported wire type {other}"
                )))
            }
        }
    }
    key.sequence = seq.id.map(|id| SequenceKey {
        id,
        start: seq.start,
        end: seq.end,
    });
    Ok(key)
}

/// Sequence parameters met so far while peeking (the last entry of a key wins, as in a
/// protobuf map).
#[derive(Default)]
struct SequenceParams {
    id: Option<SequenceId>,
    start: bool,
    end: bool,
}

impl SequenceParams {
    /// Reads one `parameters` map entry (already checked to be well formed); entries
    /// other than the three sequence keys are skipped.
    fn read(&mut self, entry: &[u8]) -> Result<(), PeekError> {
        let Some((name, value)) = map_entry(entry) else {
            return Ok(());
        };
        let which = match name {
            b"sequence_id" => 0,
            b"sequence_start" => 1,
            b"sequence_end" => 2,
            _ => return Ok(()),
        };
        let bad = |what: &str| {
            let name = String::from_utf8_lossy(name);
            PeekError(format!("parameter '{name}' must be {what}"))
        };
        let param = infer_parameter(value);
        match which {
            0 => {
                self.id = match param {
                    Some(Param::Int(0)) => None,
                    Some(Param::Int(v)) => Some(SequenceId::Int(v)),
                    Some(Param::Text(b"")) => None,
                    Some(Param::Text(t)) => Some(SequenceId::Text(
                        std::str::from_utf8(t)
                            .map_err(|_| bad("UTF-8 text"))?
                            .to_owned(),
                    )),
                    None => None,
                    Some(_) => return Err(bad("an int64, a uint64 or a string")),
                }
            }
            _ => {
                let flag = match param {
                    Some(Param::Bool(b)) => b,
                    None => false,
                    Some(_) => return Err(bad("a bool")),
                };
                if which == 1 {
                    self.start = flag;
                } else {
                    self.end = flag;
                }
            }
        }
        Ok(())
    }
}

/// The key and value bytes of one map entry (fields 1 and 2), if both are present.
fn map_entry(mut entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut key, mut value) = (None, None);
    while !entry.is_empty() {
        let tag = read_varint(&mut entry)?;
        match tag & 7 {
            0 => {
                read_varint(&mut entry)?;
                continue;
            }
            1 => {
                entry = entry.get(8..)?;
                continue;
            }
            5 => {
                entry = entry.get(4..)?;
                continue;
            }
            2 => {}
            _ => return None,
        }
        let len = usize::try_from(read_varint(&mut entry)?).ok()?;
        let bytes = entry.get(..len)?;
        entry = &entry[len..];
        match tag >> 3 {
            1 => key = Some(bytes),
            2 => value = Some(bytes),
            _ => {}
        }
    }
    Some((key?, value.unwrap_or_default()))
}

/// One `InferParameter`'s value, as far as the gateway reads it.
enum Param<'a> {
    Bool(bool),
    Int(u64),
    Text(&'a [u8]),
    Other,
}

/// `InferParameter`: 1 bool, 2 int64, 3 string, 4 double, 5 uint64 (the last one set
/// wins, as in a oneof). None when unset.
fn infer_parameter(mut param: &[u8]) -> Option<Param<'_>> {
    let mut out = None;
    while !param.is_empty() {
        let tag = read_varint(&mut param)?;
        out = Some(match (tag >> 3, tag & 7) {
            (1, 0) => Param::Bool(read_varint(&mut param)? != 0),
            (2, 0) | (5, 0) => Param::Int(read_varint(&mut param)?),
            (3, 2) => {
                let len = usize::try_from(read_varint(&mut param)?).ok()?;
                let t = param.get(..len)?;
                param = &param[len..];
                Param::Text(t)
            }
            (_, 0) => {
                read_varint(&mut param)?;
                Param::Other
            }
            (_, 1) => {
                param = param.get(8..)?;
                Param::Other
            }
            (_, 5) => {
                param = param.get(4..)?;
                Param::Other
            }
            (_, 2) => {
                let len = usize::try_from(read_varint(&mut param)?).ok()?;
                param = param.get(len..)?;
                Param::Other
            }
            _ => return None,
        });
    }
    out
}

/// Reads an integer request parameter (`parameters` map, field 4 of
/// `ModelInferRequest`) without decoding the rest: int64, uint64 or a numeric string.
/// None when absent or malformed.
/// Checks that `bytes` are a well-formed protobuf message at its top level: every tag,
/// varint and length fits. Nothing is decoded or copied; a length-delimited field is
/// skipped whole, so the cost is one step per field, not per byte.
fn check_message(mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        let tag = read_varint(&mut bytes).ok_or("truncated field tag")?;
        let field = tag >> 3;
        if field == 0 {
            return Err("field number 0".into());
        }
        match tag & 7 {
            0 => {
                read_varint(&mut bytes)
                    .ok_or_else(|| format!("truncated varint in field {field}"))?;
            }
            1 | 5 => {
                let width = if tag & 7 == 1 { 8 } else { 4 };
                bytes = bytes
                    .get(width..)
                    .ok_or_else(|| format!("truncated fixed-width field {field}"))?;
            }
            2 => {
                let len = read_varint(&mut bytes)
                    .ok_or_else(|| format!("truncated length of field {field}"))?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if bytes.len() < len {
                    return Err(format!(
                        "field {field} announces {len} bytes, {} remain",
                        bytes.len()
                    ));
                }
                bytes = &bytes[len..];
            }
            other => return Err(format!("field {field} has unsupported wire type {other}")),
        }
    }
    Ok(())
}

pub fn peek_int_parameter(mut payload: &[u8], name: &str) -> Option<i64> {
    let mut found = None;
    while !payload.is_empty() {
        let tag = read_varint(&mut payload)?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        match wire_type {
            0 => {
                read_varint(&mut payload)?;
            }
            1 => payload = payload.get(8..)?,
            5 => payload = payload.get(4..)?,
            2 => {
                let len = read_varint(&mut payload)? as usize;
                let value = payload.get(..len)?;
                payload = &payload[len..];
                if field == 4 {
                    if let Some(v) = map_entry_int(value, name) {
                        found = Some(v);
                    }
                }
            }
            _ => return None,
        }
    }
    found
}

fn map_entry_int(mut entry: &[u8], name: &str) -> Option<i64> {
    let (mut key, mut value) = (None, None);
    while !entry.is_empty() {
        let tag = read_varint(&mut entry)?;
        if tag & 7 != 2 {
            return None;
        }
        let len = read_varint(&mut entry)? as usize;
        let bytes = entry.get(..len)?;
        entry = &entry[len..];
        match tag >> 3 {
            1 => key = Some(bytes),
            2 => value = Some(bytes),
            _ => {}
        }
    }
    if key? != name.as_bytes() {
        return None;
    }
    // InferParameter: 1 bool, 2 int64, 3 string, 4 double, 5 uint64.
    let mut param = value?;
    let tag = read_varint(&mut param)?;
    match (tag >> 3, tag & 7) {
        (2, 0) | (5, 0) => read_varint(&mut param).map(|v| v as i64),
        (3, 2) => {
            let len = read_varint(&mut param)? as usize;
            std::str::from_utf8(param.get(..len)?)
                .ok()?
                .trim()
                .parse()
                .ok()
        }
        _ => None,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Bytes that, appended to a request, set its model name (field 1): protobuf keeps the
/// last value of a singular field, so the payload itself is not copied or rewritten.
pub fn append_model_name(model: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(model.len() + 2);
    put_bytes_field(&mut out, 1, model.as_bytes());
    out
}

/// Bytes that, appended to a `ModelInferRequest`, add (or replace) an int64 entry of its
/// `parameters` map (field 4), e.g. Triton's `timeout` in microseconds.
pub fn append_int_parameter(name: &str, value: i64) -> Vec<u8> {
    let mut param = Vec::with_capacity(11);
    put_varint(&mut param, 2 << 3);
    put_varint(&mut param, value as u64);
    let mut entry = Vec::with_capacity(name.len() + param.len() + 4);
    put_bytes_field(&mut entry, 1, name.as_bytes());
    put_bytes_field(&mut entry, 2, &param);
    let mut out = Vec::with_capacity(entry.len() + 3);
    put_bytes_field(&mut out, 4, &entry);
    out
}

/// The 5-byte gRPC header of an uncompressed message of `len` bytes.
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [0, l[0], l[1], l[2], l[3]]
}

/// Parses a `grpc-timeout` value ("100m", "5S", "250000u"...): 1 to 8 ASCII digits and
/// a unit, as the gRPC spec writes it; anything else is None (never a panic: the value
/// is whatever a caller sent).
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow, even in hours.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value (at most 8 digits, as the spec asks).
pub fn format_grpc_timeout(d: std::time::Duration) -> String {
    let micros = d.as_micros();
    if micros < 100_000_000 {
        format!("{micros}u")
    } else if d.as_millis() < 100_000_000 {
        format!("{}m", d.as_millis())
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// The first `max` bytes of the first element of the BYTES input named `input`
/// (`ModelInferRequest.inputs[i]` with that name), read from the raw request without
/// decoding any tensor: the key of the `prefix_affinity` policy. The element is taken
/// from the input's own `contents.bytes_contents` when it has some, else from
/// `raw_input_contents[i]`, whose BYTES elements each carry a 4-byte little-endian
/// length first (a truncated element gives what is there). None when the request has
/// no such input or does not parse that far.
///
/// Cost: one walk over the top-level field headers (tensors are skipped by their
/// length), one over the named input's own fields, and a second top-level walk only
/// when the text came as raw contents.
pub fn peek_bytes_input_prefix<'a>(payload: &'a [u8], input: &str, max: usize) -> Option<&'a [u8]> {
    // Pass 1: the input's index among `inputs` (field 5), and its typed contents.
    let mut rest = payload;
    let mut index = 0usize;
    let mut found = None;
    while !rest.is_empty() {
        let tag = read_varint(&mut rest)?;
        match tag & 7 {
            0 => {
                read_varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            5 => rest = rest.get(4..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut rest)?).ok()?;
                let value = rest.get(..len)?;
                rest = &rest[len..];
                if tag >> 3 == 5 {
                    if found.is_none() {
                        if let Some(typed) = named_input(value, input) {
                            found = Some((index, typed));
                        }
                    }
                    index += 1;
                }
            }
            _ => return None,
        }
    }
    let (index, typed) = found?;
    let cut = |b: &'a [u8]| &b[..b.len().min(max)];
    if let Some(first) = typed {
        return Some(cut(first));
    }
    // Pass 2: raw_input_contents (field 7) number `index`.
    let mut rest = payload;
    let mut raw = 0usize;
    while !rest.is_empty() {
        let tag = read_varint(&mut rest)?;
        match tag & 7 {
            0 => {
                read_varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            5 => rest = rest.get(4..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut rest)?).ok()?;
                let value = rest.get(..len)?;
                rest = &rest[len..];
                if tag >> 3 == 7 {
                    if raw == index {
                        let (n, element) = value.split_first_chunk::<4>()?;
                        let n = usize::try_from(u32::from_le_bytes(*n)).ok()?;
                        return Some(cut(&element[..element.len().min(n)]));
                    }
                    raw += 1;
                }
            }
            _ => return None,
        }
    }
    None
}

/// For an `InferInputTensor` named `name`: Some(its first `bytes_contents` element, if
/// it has one). None for another name or bytes that do not parse.
fn named_input<'a>(mut tensor: &'a [u8], name: &str) -> Option<Option<&'a [u8]>> {
    let mut named = false;
    let mut first = None;
    while !tensor.is_empty() {
        let tag = read_varint(&mut tensor)?;
        match tag & 7 {
            0 => {
                read_varint(&mut tensor)?;
            }
            1 => tensor = tensor.get(8..)?,
            5 => tensor = tensor.get(4..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut tensor)?).ok()?;
                let value = tensor.get(..len)?;
                tensor = &tensor[len..];
                match tag >> 3 {
                    1 => named = value == name.as_bytes(),
                    5 if first.is_none() => first = first_bytes_element(value),
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    named.then_some(first)
}

/// The first `bytes_contents` (field 8) element of an `InferTensorContents`.
fn first_bytes_element(mut contents: &[u8]) -> Option<&[u8]> {
    while !contents.is_empty() {
        let tag = read_varint(&mut contents)?;
        match tag & 7 {
            0 => {
                read_varint(&mut contents)?;
            }
            1 => contents = contents.get(8..)?,
            5 => contents = contents.get(4..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut contents)?).ok()?;
                let value = contents.get(..len)?;
                contents = &contents[len..];
                if tag >> 3 == 8 {
                    return Some(value);
                }
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod prefix_peek_tests {
    use super::*;
    use infergate_proto::inference::{
        model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
    };
    use prost::Message as _;

    fn input(name: &str, datatype: &str) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![1],
            ..Default::default()
        }
    }

    fn element(text: &[u8]) -> Vec<u8> {
        let mut raw = (text.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(text);
        raw
    }

    #[test]
    fn reads_the_named_input_from_raw_contents_after_its_length_prefix() {
        let req = ModelInferRequest {
            model_name: "tiny_llm".into(),
            inputs: vec![input("max_tokens", "INT32"), input("text_input", "BYTES")],
            raw_input_contents: vec![8i32.to_le_bytes().to_vec(), element(b"You are helpful. Hi")],
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        assert_eq!(
            peek_bytes_input_prefix(&bytes, "text_input", 16),
            Some(&b"You are helpful."[..])
        );
        assert_eq!(
            peek_bytes_input_prefix(&bytes, "text_input", 1000),
            Some(&b"You are helpful. Hi"[..])
        );
        assert_eq!(peek_bytes_input_prefix(&bytes, "prompt", 16), None);
        // Truncated: the length says 100, 19 bytes follow.
        let mut short = req.clone();
        short.raw_input_contents[1] = element(b"You are helpful. Hi");
        short.raw_input_contents[1][..4].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(
            peek_bytes_input_prefix(&short.encode_to_vec(), "text_input", 8),
            Some(&b"You are "[..])
        );
        // No raw contents for it: nothing to read.
        let mut none = req;
        none.raw_input_contents.truncate(1);
        assert_eq!(
            peek_bytes_input_prefix(&none.encode_to_vec(), "text_input", 8),
            None
        );
    }

    #[test]
    fn reads_typed_bytes_contents_and_survives_bad_bytes() {
        let mut text = input("text_input", "BYTES");
        text.contents = Some(InferTensorContents {
            bytes_contents: vec![b"system prompt one; user two".to_vec(), b"x".to_vec()],
            ..Default::default()
        });
        let req = ModelInferRequest {
            model_name: "tiny_llm".into(),
            inputs: vec![text],
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        assert_eq!(
            peek_bytes_input_prefix(&bytes, "text_input", 13),
            Some(&b"system prompt"[..])
        );
        for cut in 0..bytes.len() {
            // Never panics on a prefix of the message.
            let _ = peek_bytes_input_prefix(&bytes[..cut], "text_input", 13);
        }
        assert_eq!(peek_bytes_input_prefix(&[0xff; 12], "text_input", 13), None);
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_proto::inference::infer_parameter::ParameterChoice;
    use infergate_proto::inference::{InferParameter, ModelInferRequest};
    use prost::Message as _;

    fn request() -> Vec<u8> {
        ModelInferRequest {
            model_name: "simple".into(),
            model_version: "1".into(),
            id: "req-7".into(),
            raw_input_contents: vec![vec![7u8; 300]],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn peeks_routing_fields_and_skips_tensors() {
        let key = peek_route(&request(), true).expect("well-formed");
        assert_eq!(key.model, "simple");
        assert_eq!(key.version, "1");
        assert_eq!(key.id, "req-7");
    }

    fn with_params(params: &[(&str, ParameterChoice)]) -> Vec<u8> {
        let mut req = ModelInferRequest {
            model_name: "accumulate".into(),
            raw_input_contents: vec![vec![1u8; 64]],
            ..Default::default()
        };
        for (name, choice) in params {
            req.parameters.insert(
                (*name).into(),
                InferParameter {
                    parameter_choice: Some(choice.clone()),
                },
            );
        }
        req.encode_to_vec()
    }

    #[test]
    fn peeks_the_sequence_parameters() {
        use ParameterChoice::{BoolParam, Int64Param, StringParam, Uint64Param};
        let peek = |params: &[(&str, ParameterChoice)]| {
            peek_route(&with_params(params), true).map(|k| k.sequence)
        };
        let seq = |id, start, end| Ok(Some(SequenceKey { id, start, end }));
        assert_eq!(
            peek(&[
                ("sequence_id", Int64Param(42)),
                ("sequence_start", BoolParam(true)),
                ("priority", Int64Param(1)),
            ]),
            seq(SequenceId::Int(42), true, false)
        );
        assert_eq!(
            peek(&[
                ("sequence_id", StringParam("user-7".into())),
                ("sequence_end", BoolParam(true)),
            ]),
            seq(SequenceId::Text("user-7".into()), false, true)
        );
        assert_eq!(
            peek(&[("sequence_id", Uint64Param(u64::MAX))]),
            seq(SequenceId::Int(u64::MAX), false, false)
        );
        // No id, a zero id, an empty id: not a sequence, as in Triton.
        assert_eq!(peek(&[("sequence_start", BoolParam(true))]), Ok(None));
        assert_eq!(peek(&[("sequence_id", Int64Param(0))]), Ok(None));
        assert_eq!(
            peek(&[("sequence_id", StringParam(String::new()))]),
            Ok(None)
        );
        // The wrong type is refused with the parameter named.
        let bad = peek(&[("sequence_id", ParameterChoice::DoubleParam(1.5))]);
        assert!(bad.is_err_and(|e| e.0.contains("sequence_id")));
        let bad = peek(&[
            ("sequence_id", Int64Param(1)),
            ("sequence_end", Int64Param(1)),
        ]);
        assert!(bad.is_err_and(|e| e.0.contains("sequence_end")));
        // Requests that are not ModelInferRequest carry no sequence.
        let key = peek_route(&with_params(&[("sequence_id", Int64Param(3))]), false);
        assert_eq!(key.map(|k| k.sequence), Ok(None));
    }

    #[test]
    fn a_broken_nested_message_is_refused_with_its_field_named() {
        // model_name "simple", then inputs (field 5) of 3 bytes that are no message.
        let mut bad = vec![0x0a, 0x06];
        bad.extend_from_slice(b"simple");
        bad.extend_from_slice(&[0x2a, 0x03, 0xff, 0xff, 0xff]);
        let err = peek_route(&bad, true).expect_err("broken inputs");
        assert!(err.0.contains("inputs[0]"), "{}", err.0);
        // Other RPCs' requests are not ModelInferRequests: field 5 is left alone.
        assert!(peek_route(&bad, false).is_ok());
        // A well-formed request with inputs and outputs passes.
        use infergate_proto::inference::model_infer_request::{
            InferInputTensor, InferRequestedOutputTensor,
        };
        let good = ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "INT32".into(),
                shape: vec![1, 16],
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "OUTPUT0".into(),
                ..Default::default()
            }],
            raw_input_contents: vec![vec![7u8; 64]],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(peek_route(&good, true).expect("parses").model, "simple");
    }

    #[test]
    fn truncated_payload_is_rejected_with_the_field_named() {
        let bytes = request();
        let err = peek_route(&bytes[..bytes.len() - 10], true).expect_err("truncated");
        assert!(err.0.contains("field 7"), "{err}");
        assert!(peek_route(&[0xff, 0xff], true).is_err());
        assert!(peek_route(&[0x0f], true).is_err(), "wire type 7");
    }

    #[test]
    fn deframer_slices_whole_messages_and_joins_split_ones() {
        let a = Message::encode(&request());
        let b = Message::encode(b"\x0a\x01x");
        let mut joined = BytesMut::new();
        joined.extend_from_slice(&a.framed());
        joined.extend_from_slice(&b.framed());
        let joined = joined.freeze();

        let mut out = Vec::new();
        let mut d = Deframer::new(1 << 20);
        d.push(joined.clone(), &mut out).expect("ok");
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].payload().as_ref(), b"\x0a\x01x");

        // The same bytes cut every 7 bytes give the same messages.
        let mut out2 = Vec::new();
        let mut d2 = Deframer::new(1 << 20);
        for start in (0..joined.len()).step_by(7) {
            let end = (start + 7).min(joined.len());
            d2.push(joined.slice(start..end), &mut out2).expect("ok");
        }
        d2.finish().expect("complete");
        assert_eq!(out2.len(), 2);
        assert_eq!(out2[0].framed(), a.framed());
    }

    #[test]
    fn appended_fields_override_without_copying_the_payload() {
        use infergate_proto::inference::{infer_parameter::ParameterChoice, InferParameter};
        let mut bytes = request();
        bytes.extend_from_slice(&append_model_name("simple_small"));
        bytes.extend_from_slice(&append_int_parameter("timeout", 48_000));
        let decoded = ModelInferRequest::decode(bytes.as_slice()).expect("still a request");
        assert_eq!(decoded.model_name, "simple_small");
        assert_eq!(decoded.id, "req-7");
        assert_eq!(
            decoded.parameters.get("timeout"),
            Some(&InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(48_000))
            })
        );
        assert_eq!(peek_int_parameter(&bytes, "timeout"), Some(48_000));
        assert_eq!(peek_int_parameter(&bytes, "priority"), None);
        assert_eq!(
            peek_route(&bytes, true).expect("parses").model,
            "simple_small"
        );
    }

    #[test]
    fn grpc_timeout_round_trips() {
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("+5m"), None, "digits only");
        assert_eq!(parse_grpc_timeout("-5m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        // Found by fuzz/grpc_timeout: a value whose last character is not ASCII made
        // `split_at` panic inside it (bytes 31 6a ff ff ..., read as UTF-8 lossily).
        let crash =
            String::from_utf8_lossy(&[0x31, 0x6a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(parse_grpc_timeout(&crash), None);
        assert_eq!(parse_grpc_timeout("1é"), None);
        assert_eq!(parse_grpc_timeout("é"), None);
        for d in [
            Duration::from_micros(1500),
            Duration::from_secs(150),
            Duration::from_secs(200_000),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).expect("parses");
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn deframer_refuses_oversized_before_buffering() {
        let mut d = Deframer::new(10);
        let mut out = Vec::new();
        let err = d
            .push(Bytes::from_static(&[0, 0, 0, 1, 0]), &mut out)
            .expect_err("too large");
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 256,
                limit: 10
            }
        );
        let mut d = Deframer::new(10);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1]), &mut out)
            .expect("partial");
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { have: 6, want: 9 })
        ));
        assert!(matches!(
            Deframer::new(10).push(Bytes::from_static(&[9, 0, 0, 0, 0]), &mut out),
            Err(FrameError::BadFlag(9))
        ));
    }

    fn budget(name: &'static str, limit: usize) -> &'static Budget {
        Box::leak(Box::new(Budget::new(name, limit)))
    }

    #[test]
    fn a_huge_prefix_costs_what_arrived_not_what_it_announces() {
        // The probe: 64 MiB announced, 190 bytes sent, never finished.
        let mut chunk = vec![0, 4, 0, 0, 0];
        chunk.extend_from_slice(&[7u8; 190]);
        let process = budget("max_buffered_request_bytes", 1 << 30);
        let mut d = Deframer::with_budgets(64 << 20, process, None);
        let mut out = Vec::new();
        d.push(Bytes::from(chunk), &mut out)
            .expect("within the limit");
        assert!(out.is_empty());
        assert!(d.buffered() <= MIN_BUFFER, "{} bytes held", d.buffered());
        assert_eq!(process.used(), d.buffered());
        drop(d);
        // Byte by byte, the buffer follows what arrived: at most twice it (or the
        // minimum), never past the message.
        let mut d = Deframer::with_budgets(64 << 20, process, None);
        d.push(Bytes::from_static(&[0, 0, 0x10, 0, 0]), &mut out)
            .expect("1 MiB announced");
        let mut arrived = HEADER_LEN;
        for _ in 0..100_000 {
            d.push(Bytes::from_static(&[1]), &mut out).expect("ok");
            arrived += 1;
            assert!(d.buffered() <= (2 * arrived).max(MIN_BUFFER), "{arrived}");
        }
        drop(d);
        assert_eq!(
            process.used(),
            0,
            "dropping a deframer gives its bytes back"
        );
    }

    #[test]
    fn split_messages_of_any_size_and_cut_come_out_whole_and_budgets_return_to_zero() {
        let process = budget("max_buffered_request_bytes", 1 << 30);
        let connection = Arc::new(Budget::new(
            "max_buffered_request_bytes_per_connection",
            1 << 30,
        ));
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..200 {
            let messages: Vec<Vec<u8>> = (0..rng.usize(1..6))
                .map(|_| {
                    let len = match rng.u8(0..4) {
                        0 => 0,
                        1 => rng.usize(1..10),
                        2 => rng.usize(10..2000),
                        _ => rng.usize(2000..70_000),
                    };
                    (0..len).map(|_| rng.u8(..)).collect()
                })
                .collect();
            let mut wire = Vec::new();
            for m in &messages {
                wire.extend_from_slice(&Message::encode(m).framed());
            }
            let wire = Bytes::from(wire);
            let mut d = Deframer::with_budgets(1 << 20, process, Some(Arc::clone(&connection)));
            let mut out = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let end = (at + rng.usize(1..20_000)).min(wire.len());
                d.push(wire.slice(at..end), &mut out).expect("well framed");
                // Capacity follows what is held: at most twice it, or the minimum.
                assert!(d.buffered() <= (2 * d.buf.len()).max(MIN_BUFFER));
                at = end;
            }
            d.finish().expect("complete");
            let got: Vec<Bytes> = out.iter().map(Message::payload).collect();
            assert_eq!(got.len(), messages.len(), "round {round}");
            for (g, m) in got.iter().zip(&messages) {
                assert_eq!(g.as_ref(), m.as_slice(), "round {round}");
            }
            assert_eq!(d.buffered(), 0);
            assert_eq!(connection.used(), 0);
        }
        assert_eq!(process.used(), 0);
    }

    #[test]
    fn a_spent_budget_refuses_the_message_and_names_the_budget() {
        let process = budget("max_buffered_request_bytes", 10_000);
        let connection = Arc::new(Budget::new(
            "max_buffered_request_bytes_per_connection",
            4_000,
        ));
        let start = |len: usize| {
            let mut chunk = header(len).to_vec();
            chunk.extend_from_slice(&vec![1u8; 3000]);
            Bytes::from(chunk)
        };
        let mut out = Vec::new();
        let mut a = Deframer::with_budgets(1 << 20, process, Some(Arc::clone(&connection)));
        a.push(start(100_000), &mut out).expect("3 KB fit");
        // A second message on the same connection overdraws the connection's budget.
        let mut b = Deframer::with_budgets(1 << 20, process, Some(Arc::clone(&connection)));
        let err = b
            .push(start(100_000), &mut out)
            .expect_err("over the connection's");
        assert_eq!(
            err,
            FrameError::OverBudget {
                budget: "max_buffered_request_bytes_per_connection",
                limit: 4_000
            }
        );
        assert!(err
            .to_string()
            .contains("max_buffered_request_bytes_per_connection"));
        // Other connections fill the process's budget; the refusal names that one, and
        // nothing is left charged to the connection that was refused.
        let others: Vec<Deframer> = (0..2)
            .map(|_| {
                let mut d = Deframer::with_budgets(1 << 20, process, None);
                d.push(start(100_000), &mut out).expect("fits");
                d
            })
            .collect();
        let fresh = Arc::new(Budget::new(
            "max_buffered_request_bytes_per_connection",
            4_000,
        ));
        let mut c = Deframer::with_budgets(1 << 20, process, Some(Arc::clone(&fresh)));
        let err = c
            .push(start(100_000), &mut out)
            .expect_err("over the process's");
        assert_eq!(
            err,
            FrameError::OverBudget {
                budget: "max_buffered_request_bytes",
                limit: 10_000
            }
        );
        assert_eq!(fresh.used(), 0, "the connection's charge is given back");
        drop((a, b, c, others));
        assert_eq!((process.used(), connection.used()), (0, 0));
        // Whole messages inside one chunk are sliced and never charged.
        let tight = budget("max_buffered_request_bytes", 0);
        let mut d = Deframer::with_budgets(1 << 20, tight, None);
        let framed = Message::encode(&[5u8; 50_000]).framed();
        d.push(framed, &mut out).expect("no buffering needed");
    }

    #[tokio::test]
    async fn a_call_sees_the_limits_of_its_connection() {
        let connection = Arc::new(Budget::new("c", 1000));
        assert!(RequestLimits::current().connection.is_none());
        let limits = RequestLimits {
            connection: Some(Arc::clone(&connection)),
            read_timeout: Some(Duration::from_millis(5)),
        };
        let seen = limits
            .scope(async {
                let mut d = Deframer::new(1 << 20);
                let mut out = Vec::new();
                d.push(Bytes::from_static(&[0, 0, 0, 1, 0, 1, 2]), &mut out)
                    .expect("fits");
                (connection.used(), RequestLimits::current().read_timeout)
            })
            .await;
        assert_eq!(seen, (MIN_BUFFER.min(261), Some(Duration::from_millis(5))));
        assert_eq!(connection.used(), 0, "given back when the deframer dropped");
    }
}
