//! A small AMQP 0-9-1 client that reads what lapin cannot, and writes what
//! lapin refuses to.
//!
//! RabbitMQ accepts short strings (a message id, a content type, a header
//! name) that are not UTF-8 from any client; lapin's parser rejects them and
//! closes its whole connection at every delivery of such a message. The DLQ
//! tools read dead letters through this client instead: it keeps every
//! string as bytes, so a record is always readable, and says what lapin
//! would have choked on. Tests use it to publish exactly such frames.
//!
//! It speaks only what those two jobs need: PLAIN authentication, one
//! channel, `basic.get` / `ack` / `reject`, `queue.declare` (passive), and
//! `basic.publish` in confirm mode. No heartbeats: sessions are short.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::BasicProperties;
use ticketrail_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;
/// The frame size this client asks for.
const FRAME_MAX: u32 = 131_072;
/// How long a session waits for the next bytes of an answer before it
/// takes the connection for dead.
const SILENCE: Duration = Duration::from_secs(30);

/// Class and method ids of the methods this client sends or expects.
mod method {
    pub(super) const CONNECTION_START: (u16, u16) = (10, 10);
    pub(super) const CONNECTION_START_OK: (u16, u16) = (10, 11);
    pub(super) const CONNECTION_TUNE: (u16, u16) = (10, 30);
    pub(super) const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
    pub(super) const CONNECTION_OPEN: (u16, u16) = (10, 40);
    pub(super) const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
    pub(super) const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub(super) const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
    pub(super) const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub(super) const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub(super) const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub(super) const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
    pub(super) const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
    pub(super) const EXCHANGE_DECLARE_OK: (u16, u16) = (40, 11);
    pub(super) const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub(super) const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
    pub(super) const BASIC_QOS: (u16, u16) = (60, 10);
    pub(super) const BASIC_QOS_OK: (u16, u16) = (60, 11);
    pub(super) const BASIC_CONSUME: (u16, u16) = (60, 20);
    pub(super) const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
    pub(super) const BASIC_PUBLISH: (u16, u16) = (60, 40);
    pub(super) const BASIC_RETURN: (u16, u16) = (60, 50);
    pub(super) const BASIC_DELIVER: (u16, u16) = (60, 60);
    pub(super) const BASIC_GET: (u16, u16) = (60, 70);
    pub(super) const BASIC_GET_OK: (u16, u16) = (60, 71);
    pub(super) const BASIC_GET_EMPTY: (u16, u16) = (60, 72);
    pub(super) const BASIC_ACK: (u16, u16) = (60, 80);
    pub(super) const BASIC_REJECT: (u16, u16) = (60, 90);
    pub(super) const BASIC_NACK: (u16, u16) = (60, 120);
    pub(super) const CONFIRM_SELECT: (u16, u16) = (85, 10);
    pub(super) const CONFIRM_SELECT_OK: (u16, u16) = (85, 11);
}

/// Bytes that should be a UTF-8 string, kept as they came.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RawText(pub Vec<u8>);

impl RawText {
    /// The text, if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The text with invalid bytes replaced by U+FFFD.
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for RawText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.lossy())
    }
}

impl From<&str> for RawText {
    fn from(s: &str) -> Self {
        RawText(s.as_bytes().to_vec())
    }
}

/// A field-table value, strings kept as bytes.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // the AMQP field types, by name
pub enum RawValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    LongString(Vec<u8>),
    Array(Vec<RawValue>),
    Timestamp(u64),
    Table(Vec<(RawText, RawValue)>),
    Void,
    Bytes(Vec<u8>),
}

/// The basic properties of a message, strings kept as bytes.
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(missing_docs)] // the AMQP basic properties, by name
pub struct RawProperties {
    pub content_type: Option<RawText>,
    pub content_encoding: Option<RawText>,
    pub headers: Option<Vec<(RawText, RawValue)>>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<RawText>,
    pub reply_to: Option<RawText>,
    pub expiration: Option<RawText>,
    pub message_id: Option<RawText>,
    pub timestamp: Option<u64>,
    pub kind: Option<RawText>,
    pub user_id: Option<RawText>,
    pub app_id: Option<RawText>,
    pub cluster_id: Option<RawText>,
}

/// A message taken with `basic.get`.
#[derive(Debug, Clone)]
pub struct RawDelivery {
    /// The channel it came on: its delivery tag counts on that channel.
    pub channel: u16,
    /// The delivery tag, for `ack` and `reject`.
    pub delivery_tag: u64,
    /// The exchange it was published to.
    pub exchange: RawText,
    /// Its routing key.
    pub routing_key: RawText,
    /// Its properties.
    pub properties: RawProperties,
    /// Its body.
    pub body: Vec<u8>,
}

impl RawProperties {
    /// What lapin would fail to parse in these properties: every short
    /// string (property or header name) that is not UTF-8, named, with its
    /// first bytes in hex. Empty if lapin can read them.
    pub fn unreadable(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let texts = [
            ("content type", &self.content_type),
            ("content encoding", &self.content_encoding),
            ("correlation id", &self.correlation_id),
            ("reply-to", &self.reply_to),
            ("expiration", &self.expiration),
            ("message id", &self.message_id),
            ("type", &self.kind),
            ("user id", &self.user_id),
            ("app id", &self.app_id),
            ("cluster id", &self.cluster_id),
        ];
        for (what, text) in texts {
            if let Some(text) = text.as_ref().filter(|t| t.as_str().is_none()) {
                problems.push(format!("its {what} is not UTF-8 ({})", hex(&text.0)));
            }
        }
        if let Some(headers) = &self.headers {
            table_problems(headers, "", &mut problems);
        }
        problems
    }

    /// The properties as lapin's types, strings made valid UTF-8 (invalid
    /// bytes replaced by U+FFFD).
    pub fn to_lapin(&self) -> BasicProperties {
        let short = |t: &RawText| ShortString::from(bounded(t.lossy(), 255));
        let mut props = BasicProperties::default();
        if let Some(t) = &self.content_type {
            props = props.with_content_type(short(t));
        }
        if let Some(t) = &self.content_encoding {
            props = props.with_content_encoding(short(t));
        }
        if let Some(h) = &self.headers {
            props = props.with_headers(table_to_lapin(h));
        }
        if let Some(m) = self.delivery_mode {
            props = props.with_delivery_mode(m);
        }
        if let Some(p) = self.priority {
            props = props.with_priority(p);
        }
        if let Some(t) = &self.correlation_id {
            props = props.with_correlation_id(short(t));
        }
        if let Some(t) = &self.reply_to {
            props = props.with_reply_to(short(t));
        }
        if let Some(t) = &self.expiration {
            props = props.with_expiration(short(t));
        }
        if let Some(t) = &self.message_id {
            props = props.with_message_id(short(t));
        }
        if let Some(ts) = self.timestamp {
            props = props.with_timestamp(ts);
        }
        if let Some(t) = &self.kind {
            props = props.with_type(short(t));
        }
        if let Some(t) = &self.user_id {
            props = props.with_user_id(short(t));
        }
        if let Some(t) = &self.app_id {
            props = props.with_app_id(short(t));
        }
        props
    }
}

/// A lossy string cut to at most `max` bytes on a char boundary.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > 16 { " …" } else { "" };
    format!("bytes {}{more}", shown.join(" "))
}

fn table_problems(table: &[(RawText, RawValue)], path: &str, problems: &mut Vec<String>) {
    for (name, value) in table {
        let shown = format!("{path}{}", name.lossy());
        if name.as_str().is_none() {
            problems.push(format!(
                "a header name is not UTF-8 ({}, read as `{shown}`)",
                hex(&name.0)
            ));
        }
        value_problems(value, &shown, problems);
    }
}

fn value_problems(value: &RawValue, path: &str, problems: &mut Vec<String>) {
    match value {
        RawValue::Table(t) => table_problems(t, &format!("{path}."), problems),
        RawValue::Array(items) => {
            for item in items {
                value_problems(item, path, problems);
            }
        }
        _ => {}
    }
}

fn table_to_lapin(table: &[(RawText, RawValue)]) -> FieldTable {
    let mut out = FieldTable::default();
    for (name, value) in table {
        out.insert(
            ShortString::from(bounded(name.lossy(), 255)),
            value_to_lapin(value),
        );
    }
    out
}

fn value_to_lapin(value: &RawValue) -> AMQPValue {
    match value {
        RawValue::Bool(b) => AMQPValue::Boolean(*b),
        RawValue::I8(n) => AMQPValue::ShortShortInt(*n),
        RawValue::U8(n) => AMQPValue::ShortShortUInt(*n),
        RawValue::I16(n) => AMQPValue::ShortInt(*n),
        RawValue::U16(n) => AMQPValue::ShortUInt(*n),
        RawValue::I32(n) => AMQPValue::LongInt(*n),
        RawValue::U32(n) => AMQPValue::LongUInt(*n),
        RawValue::I64(n) => AMQPValue::LongLongInt(*n),
        RawValue::F32(n) => AMQPValue::Float(*n),
        RawValue::F64(n) => AMQPValue::Double(*n),
        RawValue::Decimal(scale, value) => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        RawValue::LongString(s) => AMQPValue::LongString(LongString::from(s.clone())),
        RawValue::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(value_to_lapin).collect::<Vec<_>>(),
        )),
        RawValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        RawValue::Table(t) => AMQPValue::FieldTable(table_to_lapin(t)),
        RawValue::Void => AMQPValue::Void,
        RawValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
    }
}

fn malformed(what: &str) -> Error {
    Error::new(
        ErrorKind::Broker,
        format!("malformed AMQP frame from the broker: {what}"),
    )
}

/// Reads the fields of one frame payload.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn need(&self, n: usize, what: &str) -> Result<()> {
        if self.0.remaining() < n {
            return Err(malformed(&format!("{what} is cut short")));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8> {
        self.need(1, "a byte")?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16> {
        self.need(2, "a short")?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32> {
        self.need(4, "a long")?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64> {
        self.need(8, "a long long")?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        self.need(n, "a string")?;
        let out = self.0[..n].to_vec();
        self.0.advance(n);
        Ok(out)
    }
    fn short_string(&mut self) -> Result<RawText> {
        let n = usize::from(self.u8()?);
        Ok(RawText(self.bytes(n)?))
    }
    fn long_string(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
    fn table(&mut self) -> Result<Vec<(RawText, RawValue)>> {
        let n = self.u32()? as usize;
        self.need(n, "a field table")?;
        let mut inner = Reader(&self.0[..n]);
        self.0.advance(n);
        let mut fields = Vec::new();
        while inner.0.has_remaining() {
            let name = inner.short_string()?;
            fields.push((name, inner.value()?));
        }
        Ok(fields)
    }
    fn value(&mut self) -> Result<RawValue> {
        Ok(match self.u8()? {
            b't' => RawValue::Bool(self.u8()? != 0),
            b'b' => RawValue::I8(self.u8()? as i8),
            b'B' => RawValue::U8(self.u8()?),
            b's' => RawValue::I16(self.u16()? as i16),
            b'u' => RawValue::U16(self.u16()?),
            b'I' => RawValue::I32(self.u32()? as i32),
            b'i' => RawValue::U32(self.u32()?),
            b'l' => RawValue::I64(self.u64()? as i64),
            b'f' => RawValue::F32(f32::from_bits(self.u32()?)),
            b'd' => RawValue::F64(f64::from_bits(self.u64()?)),
            b'D' => RawValue::Decimal(self.u8()?, self.u32()?),
            b'S' => RawValue::LongString(self.long_string()?),
            b'A' => {
                let n = self.u32()? as usize;
                self.need(n, "a field array")?;
                let mut inner = Reader(&self.0[..n]);
                self.0.advance(n);
                let mut items = Vec::new();
                while inner.0.has_remaining() {
                    items.push(inner.value()?);
                }
                RawValue::Array(items)
            }
            b'T' => RawValue::Timestamp(self.u64()?),
            b'F' => RawValue::Table(self.table()?),
            b'V' => RawValue::Void,
            b'x' => RawValue::Bytes(self.long_string()?),
            other => return Err(malformed(&format!("unknown field type {other:#04x}"))),
        })
    }
    fn properties(&mut self) -> Result<RawProperties> {
        let flags = self.u16()?;
        let has = |bit: u16| flags & (1 << bit) != 0;
        let mut p = RawProperties::default();
        if has(15) {
            p.content_type = Some(self.short_string()?);
        }
        if has(14) {
            p.content_encoding = Some(self.short_string()?);
        }
        if has(13) {
            p.headers = Some(self.table()?);
        }
        if has(12) {
            p.delivery_mode = Some(self.u8()?);
        }
        if has(11) {
            p.priority = Some(self.u8()?);
        }
        if has(10) {
            p.correlation_id = Some(self.short_string()?);
        }
        if has(9) {
            p.reply_to = Some(self.short_string()?);
        }
        if has(8) {
            p.expiration = Some(self.short_string()?);
        }
        if has(7) {
            p.message_id = Some(self.short_string()?);
        }
        if has(6) {
            p.timestamp = Some(self.u64()?);
        }
        if has(5) {
            p.kind = Some(self.short_string()?);
        }
        if has(4) {
            p.user_id = Some(self.short_string()?);
        }
        if has(3) {
            p.app_id = Some(self.short_string()?);
        }
        if has(2) {
            p.cluster_id = Some(self.short_string()?);
        }
        Ok(p)
    }
}

/// Writes the fields of one frame payload.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn method(id: (u16, u16)) -> Self {
        let mut w = Writer::default();
        w.0.put_u16(id.0);
        w.0.put_u16(id.1);
        w
    }
    fn u8(mut self, n: u8) -> Self {
        self.0.put_u8(n);
        self
    }
    fn u16(mut self, n: u16) -> Self {
        self.0.put_u16(n);
        self
    }
    fn u32(mut self, n: u32) -> Self {
        self.0.put_u32(n);
        self
    }
    fn u64(mut self, n: u64) -> Self {
        self.0.put_u64(n);
        self
    }
    fn short(mut self, s: &[u8]) -> Self {
        self.0.put_u8(s.len().min(255) as u8);
        self.0.extend_from_slice(&s[..s.len().min(255)]);
        self
    }
    fn long(mut self, s: &[u8]) -> Self {
        self.0.put_u32(s.len() as u32);
        self.0.extend_from_slice(s);
        self
    }
    fn table(mut self, table: &[(RawText, RawValue)]) -> Self {
        let mut inner = Writer::default();
        for (name, value) in table {
            inner = inner.short(&name.0).value(value);
        }
        self.0.put_u32(inner.0.len() as u32);
        self.0.extend(inner.0);
        self
    }
    fn value(self, value: &RawValue) -> Self {
        match value {
            RawValue::Bool(b) => self.u8(b't').u8(u8::from(*b)),
            RawValue::I8(n) => self.u8(b'b').u8(*n as u8),
            RawValue::U8(n) => self.u8(b'B').u8(*n),
            RawValue::I16(n) => self.u8(b's').u16(*n as u16),
            RawValue::U16(n) => self.u8(b'u').u16(*n),
            RawValue::I32(n) => self.u8(b'I').u32(*n as u32),
            RawValue::U32(n) => self.u8(b'i').u32(*n),
            RawValue::I64(n) => self.u8(b'l').u64(*n as u64),
            RawValue::F32(n) => self.u8(b'f').u32(n.to_bits()),
            RawValue::F64(n) => self.u8(b'd').u64(n.to_bits()),
            RawValue::Decimal(scale, value) => self.u8(b'D').u8(*scale).u32(*value),
            RawValue::LongString(s) => self.u8(b'S').long(s),
            RawValue::Array(items) => {
                let mut inner = Writer::default();
                for item in items {
                    inner = inner.value(item);
                }
                self.u8(b'A').long(&inner.0)
            }
            RawValue::Timestamp(t) => self.u8(b'T').u64(*t),
            RawValue::Table(t) => self.u8(b'F').table(t),
            RawValue::Void => self.u8(b'V'),
            RawValue::Bytes(b) => self.u8(b'x').long(b),
        }
    }
    fn properties(self, p: &RawProperties) -> Self {
        // Property flags, highest bit first, in the order the fields follow.
        let mut flags = 0u16;
        let mut body = Writer::default();
        for (bit, text) in [(15, &p.content_type), (14, &p.content_encoding)] {
            if let Some(t) = text {
                flags |= 1 << bit;
                body = body.short(&t.0);
            }
        }
        if let Some(h) = &p.headers {
            flags |= 1 << 13;
            body = body.table(h);
        }
        for (bit, n) in [(12, p.delivery_mode), (11, p.priority)] {
            if let Some(n) = n {
                flags |= 1 << bit;
                body = body.u8(n);
            }
        }
        for (bit, text) in [
            (10, &p.correlation_id),
            (9, &p.reply_to),
            (8, &p.expiration),
            (7, &p.message_id),
        ] {
            if let Some(t) = text {
                flags |= 1 << bit;
                body = body.short(&t.0);
            }
        }
        if let Some(ts) = p.timestamp {
            flags |= 1 << 6;
            body = body.u64(ts);
        }
        for (bit, text) in [
            (5, &p.kind),
            (4, &p.user_id),
            (3, &p.app_id),
            (2, &p.cluster_id),
        ] {
            if let Some(t) = text {
                flags |= 1 << bit;
                body = body.short(&t.0);
            }
        }
        let mut out = self.u16(flags);
        out.0.extend(body.0);
        out
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How the raw client reaches a TLS broker: the CA to trust besides the
/// system's.
#[derive(Clone, Default)]
pub(crate) struct RawTls {
    pub(crate) ca_pem: Option<String>,
}

/// One connection, with channel 1 open (and more opened by
/// [`consume`](RawConnection::consume)).
pub struct RawConnection {
    /// The broker's product and version, from `connection.start`
    /// (`RabbitMQ 3.10.8`).
    pub server: String,
    stream: Pin<Box<dyn Stream>>,
    read: BytesMut,
    frame_max: u32,
    channel_max: u16,
    /// Deliveries read while waiting for a reply.
    pending: VecDeque<RawDelivery>,
    confirming: bool,
    published: u64,
}

impl RawConnection {
    /// The highest channel number the broker allows.
    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }
}

impl fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConnection")
            .field("frame_max", &self.frame_max)
            .finish_non_exhaustive()
    }
}

/// A frame read off the wire.
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

fn io_error(doing: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::new(ErrorKind::Connection, doing.to_owned()).with_source(e)
}

impl RawConnection {
    /// Connects to `url` (`amqp://` or `amqps://`), authenticates and opens
    /// a channel, within `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self> {
        Self::connect_with(url, &RawTls::default(), timeout).await
    }

    pub(crate) async fn connect_with(url: &str, tls: &RawTls, timeout: Duration) -> Result<Self> {
        let uri: AMQPUri = url.parse().map_err(|e: String| {
            Error::config(format!(
                "invalid RabbitMQ URL `{}`: {e}",
                ticketrail_core::redact_url(url)
            ))
        })?;
        let address = format!("{}:{}", uri.authority.host, uri.authority.port);
        let connecting = Self::open(&uri, tls, &address);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("connecting to RabbitMQ at {address} took over {timeout:?}"),
            )),
        }
    }

    async fn open(uri: &AMQPUri, tls: &RawTls, address: &str) -> Result<Self> {
        let tcp = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("connecting to RabbitMQ at {address}"),
                )
                .with_source(e)
            })?;
        let _ = tcp.set_nodelay(true);
        let stream: Pin<Box<dyn Stream>> = match uri.scheme {
            AMQPScheme::AMQP => Box::pin(tcp),
            AMQPScheme::AMQPS => {
                Box::pin(tls_stream(tcp, &uri.authority.host, tls, address).await?)
            }
        };
        let mut conn = RawConnection {
            server: String::new(),
            stream,
            read: BytesMut::with_capacity(8192),
            frame_max: FRAME_MAX,
            channel_max: u16::MAX,
            pending: VecDeque::new(),
            confirming: false,
            published: 0,
        };
        conn.handshake(uri, address).await?;
        Ok(conn)
    }

    async fn handshake(&mut self, uri: &AMQPUri, address: &str) -> Result<()> {
        self.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(io_error("sending the AMQP protocol header"))?;
        let start = self.expect(0, method::CONNECTION_START).await?;
        let mut r = Reader(&start);
        let (_major, _minor) = (r.u8()?, r.u8()?);
        let properties = r.table()?;
        let field = |name: &str| {
            properties.iter().find_map(|(k, v)| match v {
                RawValue::LongString(s) if k.0 == name.as_bytes() => {
                    Some(String::from_utf8_lossy(s).into_owned())
                }
                _ => None,
            })
        };
        self.server = format!(
            "{} {}",
            field("product").unwrap_or_else(|| "AMQP broker".into()),
            field("version").unwrap_or_else(|| "(version unknown)".into())
        );
        let user = &uri.authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        let client = vec![(
            RawText::from("product"),
            RawValue::LongString(b"ticketrail raw reader".to_vec()),
        )];
        let start_ok = Writer::method(method::CONNECTION_START_OK)
            .table(&client)
            .short(b"PLAIN")
            .long(response.as_bytes())
            .short(b"en_US");
        self.send_method(0, start_ok).await?;
        let tune = match self.expect(0, method::CONNECTION_TUNE).await {
            Ok(tune) => tune,
            Err(e) if e.kind() == ErrorKind::Connection => {
                // RabbitMQ closes the socket on bad credentials.
                return Err(Error::new(
                    ErrorKind::Auth,
                    format!("RabbitMQ at {address} refused the credentials"),
                )
                .with_source(e));
            }
            Err(e) => return Err(e),
        };
        let mut r = Reader(&tune);
        let channel_max = r.u16()?;
        self.channel_max = match channel_max {
            0 => u16::MAX,
            n => n,
        };
        let frame_max = r.u32()?;
        self.frame_max = match frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        let tune_ok = Writer::method(method::CONNECTION_TUNE_OK)
            .u16(channel_max)
            .u32(self.frame_max)
            .u16(0);
        self.send_method(0, tune_ok).await?;
        let open = Writer::method(method::CONNECTION_OPEN)
            .short(uri.vhost.as_bytes())
            .short(b"")
            .u8(0);
        self.send_method(0, open).await?;
        self.expect(0, method::CONNECTION_OPEN_OK).await?;
        self.send_method(CHANNEL, Writer::method(method::CHANNEL_OPEN).short(b""))
            .await?;
        self.expect(CHANNEL, method::CHANNEL_OPEN_OK).await?;
        Ok(())
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        put_frame(&mut frame, kind, channel, payload);
        self.send_bytes(&frame).await
    }

    async fn send_bytes(&mut self, frames: &[u8]) -> Result<()> {
        self.stream
            .write_all(frames)
            .await
            .map_err(io_error("writing to RabbitMQ"))
    }

    async fn send_method(&mut self, channel: u16, method: Writer) -> Result<()> {
        self.send_frame(FRAME_METHOD, channel, &method.0).await
    }

    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if self.read.len() >= 7 {
                let size =
                    u32::from_be_bytes(self.read[3..7].try_into().expect("4 bytes")) as usize;
                if self.read.len() >= 8 + size {
                    let kind = self.read[0];
                    let channel = u16::from_be_bytes([self.read[1], self.read[2]]);
                    let mut frame = self.read.split_to(8 + size);
                    if frame[7 + size] != FRAME_END {
                        return Err(malformed("a frame does not end with 0xCE"));
                    }
                    frame.advance(7);
                    frame.truncate(size);
                    if kind == FRAME_HEARTBEAT {
                        continue;
                    }
                    return Ok(Frame {
                        kind,
                        channel,
                        payload: frame.to_vec(),
                    });
                }
            }
            // No heartbeats here, and every read waits for the answer to
            // something sent: a connection silent this long is dead (a
            // dropped flow closes nothing), and the session ends with an
            // error instead of waiting for good.
            let n = tokio::time::timeout(SILENCE, self.stream.read_buf(&mut self.read))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("RabbitMQ sent nothing for {SILENCE:?}: the connection is gone"),
                    )
                })?
                .map_err(io_error("reading from RabbitMQ"))?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::Connection,
                    "RabbitMQ closed the connection",
                ));
            }
        }
    }

    /// The next method frame, with a `close` from the broker turned into the
    /// error it carries.
    async fn read_method(&mut self) -> Result<((u16, u16), u16, Vec<u8>)> {
        let frame = self.read_frame().await?;
        if frame.kind != FRAME_METHOD {
            return Err(malformed(&format!(
                "expected a method frame, got type {}",
                frame.kind
            )));
        }
        let mut r = Reader(&frame.payload);
        let id = (r.u16()?, r.u16()?);
        let args = r.0.to_vec();
        if id == method::CONNECTION_CLOSE || id == method::CHANNEL_CLOSE {
            let mut r = Reader(&args);
            let code = r.u16()?;
            let text = r.short_string()?.lossy();
            let reply = if id == method::CHANNEL_CLOSE {
                method::CHANNEL_CLOSE_OK
            } else {
                method::CONNECTION_CLOSE_OK
            };
            let _ = self.send_method(frame.channel, Writer::method(reply)).await;
            let kind = match code {
                403 | 530 => ErrorKind::Auth,
                404 => ErrorKind::NotFound,
                406 => ErrorKind::Config,
                320 => ErrorKind::Connection,
                _ => ErrorKind::Broker,
            };
            return Err(Error::new(
                kind,
                format!("RabbitMQ closed the channel: {code} {text}"),
            ));
        }
        Ok((id, frame.channel, args))
    }

    async fn expect(&mut self, channel: u16, id: (u16, u16)) -> Result<Vec<u8>> {
        let (mut got, mut on, mut args) = self.read_method().await?;
        while got == method::BASIC_DELIVER {
            // A consumer's delivery came first (settling freed its
            // prefetch): keep it for `next_delivery`.
            let delivery = self.read_delivery(on, &args).await?;
            self.pending.push_back(delivery);
            (got, on, args) = self.read_method().await?;
        }
        if got != id || on != channel {
            return Err(malformed(&format!(
                "expected method {id:?} on channel {channel}, got {got:?} on {on}"
            )));
        }
        Ok(args)
    }

    /// Takes the next message of `queue`, unacknowledged; `None` if the
    /// queue is empty.
    pub async fn get(&mut self, queue: &str) -> Result<Option<RawDelivery>> {
        let get = Writer::method(method::BASIC_GET)
            .u16(0)
            .short(queue.as_bytes())
            .u8(0);
        self.send_method(CHANNEL, get).await?;
        let (id, _, args) = self.read_method().await?;
        if id == method::BASIC_GET_EMPTY {
            return Ok(None);
        }
        if id != method::BASIC_GET_OK {
            return Err(malformed(&format!(
                "expected get-ok or get-empty, got {id:?}"
            )));
        }
        let mut r = Reader(&args);
        let delivery_tag = r.u64()?;
        let _redelivered = r.u8()?;
        let exchange = r.short_string()?;
        let routing_key = r.short_string()?;
        self.read_content(CHANNEL, delivery_tag, exchange, routing_key)
            .await
            .map(Some)
    }

    /// Starts delivering `queue`'s messages on `channel` (opened here
    /// unless it is the first), unacknowledged, at most `prefetch` of them;
    /// read them with [`next_delivery`](RawConnection::next_delivery). On a
    /// quorum queue this is far faster than [`get`](RawConnection::get),
    /// where every get is a replicated command; and as nothing is read
    /// before it is asked for, TCP flow control bounds what waits in this
    /// process. To read past `prefetch` messages without settling them,
    /// consume again on a new channel.
    pub async fn consume(&mut self, channel: u16, queue: &str, prefetch: u16) -> Result<()> {
        if channel != CHANNEL {
            self.send_method(channel, Writer::method(method::CHANNEL_OPEN).short(b""))
                .await?;
            self.expect(channel, method::CHANNEL_OPEN_OK).await?;
        }
        let qos = Writer::method(method::BASIC_QOS).u32(0).u16(prefetch).u8(0);
        self.send_method(channel, qos).await?;
        self.expect(channel, method::BASIC_QOS_OK).await?;
        let consume = Writer::method(method::BASIC_CONSUME)
            .u16(0)
            .short(queue.as_bytes())
            .short(b"")
            .u8(0)
            .table(&[]);
        self.send_method(channel, consume).await?;
        self.expect(channel, method::BASIC_CONSUME_OK).await?;
        Ok(())
    }

    /// The next message delivered on any channel after
    /// [`consume`](RawConnection::consume).
    pub async fn next_delivery(&mut self) -> Result<RawDelivery> {
        if let Some(delivery) = self.pending.pop_front() {
            return Ok(delivery);
        }
        let (id, channel, args) = self.read_method().await?;
        if id != method::BASIC_DELIVER {
            return Err(malformed(&format!("expected a delivery, got {id:?}")));
        }
        self.read_delivery(channel, &args).await
    }

    /// Like [`next_delivery`](RawConnection::next_delivery), but `None` if
    /// nothing at all arrives within `wait`.
    pub async fn next_delivery_within(&mut self, wait: Duration) -> Result<Option<RawDelivery>> {
        if self.pending.is_empty() && self.read.is_empty() {
            // Cancel-safe: bytes are either read into the buffer or not.
            match tokio::time::timeout(wait, self.stream.read_buf(&mut self.read)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        "RabbitMQ closed the connection",
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(io_error("reading from RabbitMQ")(e)),
            }
        }
        self.next_delivery().await.map(Some)
    }

    /// Whether deliveries read while waiting for a reply are waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The rest of a delivery whose `basic.deliver` came on `channel`.
    async fn read_delivery(&mut self, channel: u16, args: &[u8]) -> Result<RawDelivery> {
        let mut r = Reader(args);
        let _consumer_tag = r.short_string()?;
        let delivery_tag = r.u64()?;
        let _redelivered = r.u8()?;
        let exchange = r.short_string()?;
        let routing_key = r.short_string()?;
        self.read_content(channel, delivery_tag, exchange, routing_key)
            .await
    }

    /// The content header and body frames after a get-ok or a deliver.
    async fn read_content(
        &mut self,
        channel: u16,
        delivery_tag: u64,
        exchange: RawText,
        routing_key: RawText,
    ) -> Result<RawDelivery> {
        let header = self.read_frame().await?;
        if header.kind != FRAME_HEADER {
            return Err(malformed("expected a content header after a delivery"));
        }
        let mut r = Reader(&header.payload);
        let _class = r.u16()?;
        let _weight = r.u16()?;
        let size = r.u64()? as usize;
        let properties = r.properties()?;
        let mut body = Vec::with_capacity(size.min(64 << 20));
        while body.len() < size {
            let frame = self.read_frame().await?;
            if frame.kind != FRAME_BODY {
                return Err(malformed("expected a body frame"));
            }
            body.extend_from_slice(&frame.payload);
        }
        Ok(RawDelivery {
            channel,
            delivery_tag,
            exchange,
            routing_key,
            properties,
            body,
        })
    }

    /// Acknowledges a message taken with [`get`](RawConnection::get) or
    /// [`next_delivery`](RawConnection::next_delivery).
    pub async fn ack(&mut self, channel: u16, delivery_tag: u64) -> Result<()> {
        let ack = Writer::method(method::BASIC_ACK).u64(delivery_tag).u8(0);
        self.send_method(channel, ack).await
    }

    /// Hands a message taken with [`get`](RawConnection::get) or
    /// [`next_delivery`](RawConnection::next_delivery) back to its
    /// queue.
    pub async fn reject(&mut self, channel: u16, delivery_tag: u64, requeue: bool) -> Result<()> {
        let reject = Writer::method(method::BASIC_REJECT)
            .u64(delivery_tag)
            .u8(u8::from(requeue));
        self.send_method(channel, reject).await
    }

    /// The number of ready messages and consumers of `queue` (a passive
    /// declare); [`ErrorKind::NotFound`] if there is no such queue.
    pub async fn queue_counts(&mut self, queue: &str) -> Result<(u32, u32)> {
        let declare = Writer::method(method::QUEUE_DECLARE)
            .u16(0)
            .short(queue.as_bytes())
            .u8(0b0000_0001) // passive
            .table(&[]);
        self.send_method(CHANNEL, declare).await?;
        let args = match self.expect(CHANNEL, method::QUEUE_DECLARE_OK).await {
            Ok(args) => args,
            Err(e) => {
                // The broker closed the channel (404 for a missing queue):
                // open it again, so the connection stays usable.
                self.send_method(CHANNEL, Writer::method(method::CHANNEL_OPEN).short(b""))
                    .await?;
                self.expect(CHANNEL, method::CHANNEL_OPEN_OK).await?;
                return Err(e);
            }
        };
        let mut r = Reader(&args);
        let _name = r.short_string()?;
        Ok((r.u32()?, r.u32()?))
    }

    /// Ready messages and consumers of each of `queues`, `None` for one that
    /// does not exist, in two round trips per batch of up to 512 queues
    /// instead of one or two per queue. Each is looked for with a passive
    /// declare on a channel of its own, since a miss (404) closes the
    /// channel it came on. It uses the channels above the first: call it
    /// with no consumer open.
    pub async fn queue_counts_many(
        &mut self,
        queues: &[String],
    ) -> Result<Vec<Option<(u32, u32)>>> {
        self.passive_many(Object::Queue, queues).await
    }

    /// Which of `exchanges` exist, as [`queue_counts_many`](Self::queue_counts_many) looks.
    pub async fn exchanges_exist(&mut self, exchanges: &[String]) -> Result<Vec<bool>> {
        let found = self.passive_many(Object::Exchange, exchanges).await?;
        Ok(found.into_iter().map(|f| f.is_some()).collect())
    }

    async fn passive_many(
        &mut self,
        object: Object,
        names: &[String],
    ) -> Result<Vec<Option<(u32, u32)>>> {
        const BATCH: usize = 512;
        let batch = BATCH.min(usize::from(self.channel_max.max(2) - 1));
        let mut counts = Vec::with_capacity(names.len());
        for chunk in names.chunks(batch) {
            counts.extend(self.passive_batch(object, chunk).await?);
        }
        Ok(counts)
    }

    async fn passive_batch(
        &mut self,
        object: Object,
        names: &[String],
    ) -> Result<Vec<Option<(u32, u32)>>> {
        let first = CHANNEL + 1;
        let mut frames = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let channel = first + i as u16;
            let open = Writer::method(method::CHANNEL_OPEN).short(b"");
            put_frame(&mut frames, FRAME_METHOD, channel, &open.0);
            let declare = match object {
                Object::Queue => Writer::method(method::QUEUE_DECLARE)
                    .u16(0)
                    .short(name.as_bytes())
                    .u8(0b0000_0001), // passive
                Object::Exchange => Writer::method(method::EXCHANGE_DECLARE)
                    .u16(0)
                    .short(name.as_bytes())
                    .short(b"")
                    .u8(0b0000_0001), // passive
            };
            put_frame(&mut frames, FRAME_METHOD, channel, &declare.table(&[]).0);
        }
        self.send_bytes(&frames).await?;
        let mut counts = vec![None; names.len()];
        let mut open = Vec::new();
        let mut refused = None;
        let mut answered = 0;
        while answered < names.len() {
            let frame = self.read_frame().await?;
            let at = usize::from(frame.channel.wrapping_sub(first));
            if frame.kind != FRAME_METHOD || at >= names.len() {
                return Err(malformed(&format!(
                    "expected answers to passive declares, got a frame of type {} on channel {}",
                    frame.kind, frame.channel
                )));
            }
            let mut r = Reader(&frame.payload);
            match (r.u16()?, r.u16()?) {
                method::CHANNEL_OPEN_OK => {}
                method::QUEUE_DECLARE_OK => {
                    let _name = r.short_string()?;
                    counts[at] = Some((r.u32()?, r.u32()?));
                    open.push(frame.channel);
                    answered += 1;
                }
                method::EXCHANGE_DECLARE_OK => {
                    counts[at] = Some((0, 0));
                    open.push(frame.channel);
                    answered += 1;
                }
                method::CHANNEL_CLOSE => {
                    let code = r.u16()?;
                    let text = r.short_string()?.lossy();
                    self.send_method(frame.channel, Writer::method(method::CHANNEL_CLOSE_OK))
                        .await?;
                    if code != 404 && refused.is_none() {
                        refused = Some(Error::new(
                            ErrorKind::Broker,
                            format!("looking for {object} `{}`: {code} {text}", names[at]),
                        ));
                    }
                    answered += 1;
                }
                other => {
                    return Err(malformed(&format!(
                        "expected an answer to a passive declare, got method {other:?}"
                    )))
                }
            }
        }
        let mut frames = Vec::new();
        for channel in &open {
            let close = channel_close();
            put_frame(&mut frames, FRAME_METHOD, *channel, &close.0);
        }
        self.send_bytes(&frames).await?;
        for _ in &open {
            let (id, on, _) = self.read_method().await?;
            if id != method::CHANNEL_CLOSE_OK {
                return Err(malformed(&format!(
                    "expected channel {on} to close, got {id:?}"
                )));
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(counts),
        }
    }

    /// Publishes a message exactly as given (any bytes in any short string)
    /// and waits for the broker's confirm. With `mandatory`, an unroutable
    /// message is [`ErrorKind::Unroutable`].
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &[u8],
        properties: &RawProperties,
        body: &[u8],
        mandatory: bool,
    ) -> Result<()> {
        if !self.confirming {
            self.send_method(CHANNEL, Writer::method(method::CONFIRM_SELECT).u8(0))
                .await?;
            self.expect(CHANNEL, method::CONFIRM_SELECT_OK).await?;
            self.confirming = true;
        }
        let publish = Writer::method(method::BASIC_PUBLISH)
            .u16(0)
            .short(exchange.as_bytes())
            .short(routing_key)
            .u8(u8::from(mandatory));
        self.send_method(CHANNEL, publish).await?;
        let header = Writer::default()
            .u16(60)
            .u16(0)
            .u64(body.len() as u64)
            .properties(properties);
        self.send_frame(FRAME_HEADER, CHANNEL, &header.0).await?;
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            self.send_frame(FRAME_BODY, CHANNEL, part).await?;
        }
        self.published += 1;
        let mut returned = false;
        loop {
            let (id, _, args) = self.read_method().await?;
            match id {
                method::BASIC_RETURN => {
                    returned = true;
                    // Skip the returned message's header and body.
                    let header = self.read_frame().await?;
                    let mut r = Reader(&header.payload);
                    let (_, _, size) = (r.u16()?, r.u16()?, r.u64()? as usize);
                    let mut seen = 0;
                    while seen < size {
                        seen += self.read_frame().await?.payload.len();
                    }
                }
                method::BASIC_ACK if returned => {
                    return Err(Error::new(
                        ErrorKind::Unroutable,
                        format!("no queue is bound for `{exchange}` with that routing key"),
                    ))
                }
                method::BASIC_ACK => return Ok(()),
                method::BASIC_NACK => {
                    let _ = args;
                    return Err(Error::new(
                        ErrorKind::Broker,
                        "RabbitMQ refused the message (nack)",
                    ));
                }
                other => {
                    return Err(malformed(&format!(
                        "unexpected method {other:?} after a publish"
                    )))
                }
            }
        }
    }

    /// Closes `channel`: what was delivered on it and not settled goes back
    /// to its queue, and deliveries still on their way on it are dropped.
    /// The first channel, which carries this connection's own commands, is
    /// opened again.
    pub async fn close_channel(&mut self, channel: u16) -> Result<()> {
        let close = channel_close();
        self.send_method(channel, close).await?;
        loop {
            let (id, on, args) = self.read_method().await?;
            if id == method::BASIC_DELIVER {
                let delivery = self.read_delivery(on, &args).await?;
                if on != channel {
                    self.pending.push_back(delivery);
                }
            } else if id == method::CHANNEL_CLOSE_OK && on == channel {
                break;
            } else {
                return Err(malformed(&format!(
                    "expected channel {channel} to close, got {id:?} on {on}"
                )));
            }
        }
        self.pending.retain(|d| d.channel != channel);
        if channel == CHANNEL {
            self.send_method(CHANNEL, Writer::method(method::CHANNEL_OPEN).short(b""))
                .await?;
            self.expect(CHANNEL, method::CHANNEL_OPEN_OK).await?;
            self.confirming = false;
        }
        Ok(())
    }

    /// Closes the connection; unacknowledged messages go back to their queues.
    pub async fn close(mut self) {
        self.shutdown().await;
    }

    /// [`close`](RawConnection::close), for a connection that is shared.
    pub async fn shutdown(&mut self) {
        let close = Writer::method(method::CONNECTION_CLOSE)
            .u16(200)
            .short(b"done")
            .u16(0)
            .u16(0);
        if self.send_method(0, close).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match self.read_frame().await {
                        Ok(f)
                            if f.kind == FRAME_METHOD && f.payload.starts_with(&[0, 10, 0, 51]) =>
                        {
                            break
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            })
            .await;
        }
    }
}

/// What a passive declare looks for.
#[derive(Clone, Copy)]
enum Object {
    Queue,
    Exchange,
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Object::Queue => "queue",
            Object::Exchange => "exchange",
        })
    }
}

/// A `channel.close` of ours: reply 200, for no method of the broker's.
fn channel_close() -> Writer {
    Writer::method(method::CHANNEL_CLOSE)
        .u16(200)
        .short(b"done")
        .u16(0)
        .u16(0)
}

/// Appends one frame to `out`.
fn put_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
    out.put_u8(FRAME_END);
}

async fn tls_stream(
    tcp: TcpStream,
    host: &str,
    tls: &RawTls,
    address: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = &tls.ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert
                .map_err(|e| Error::config("the CA certificate is not valid PEM").with_source(e))?;
            roots
                .add(cert)
                .map_err(|e| Error::config("the CA certificate is not usable").with_source(e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("TLS settings").with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| Error::config(format!("`{host}` is not a TLS server name")).with_source(e))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("TLS with RabbitMQ at {address} failed: its certificate is not trusted, or TLS is not set up on one side"),
            )
            .with_source(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_with_any_bytes() {
        let props = RawProperties {
            content_type: Some(RawText(b"application/\xff".to_vec())),
            headers: Some(vec![
                (RawText(b"ok".to_vec()), RawValue::LongString(b"v".to_vec())),
                (RawText(b"bad\xfe".to_vec()), RawValue::I64(-3)),
                (
                    RawText(b"nested".to_vec()),
                    RawValue::Table(vec![(RawText(b"\xc3".to_vec()), RawValue::Void)]),
                ),
            ]),
            delivery_mode: Some(2),
            message_id: Some(RawText(b"id-\x80".to_vec())),
            timestamp: Some(1_700_000_000),
            ..RawProperties::default()
        };
        let bytes = Writer::default().properties(&props).0;
        let back = Reader(&bytes).properties().unwrap();
        assert_eq!(back, props);
        let problems = back.unreadable();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("content type"), "{problems:?}");
        assert!(problems
            .iter()
            .any(|p| p.contains("message id") && p.contains("80")));
        assert!(
            problems.iter().any(|p| p.contains("nested.")),
            "{problems:?}"
        );
        let lapin = back.to_lapin();
        assert_eq!(lapin.message_id().as_ref().unwrap().as_str(), "id-\u{fffd}");
    }

    #[test]
    fn readable_properties_have_no_problems() {
        let props = RawProperties {
            content_type: Some(RawText::from("application/json")),
            message_id: Some(RawText::from("abc")),
            ..RawProperties::default()
        };
        assert!(props.unreadable().is_empty());
    }
}
