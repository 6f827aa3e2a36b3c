//! Publishers that write what ordinary clients refuse to: NATS header
//! blocks of any bytes, AMQP properties that are not UTF-8.

use std::time::Duration;

use ticketrail_core::{Error, ErrorKind, Result};
use ticketrail_rabbitmq::raw::RawConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Publishes one message to JetStream over a bare TCP connection, with
/// `header_block` exactly as given (`None`: no headers), and waits for the
/// stream's acknowledgement. `address` is `host:port`.
pub async fn raw_nats_publish(
    address: &str,
    subject: &str,
    header_block: Option<&[u8]>,
    payload: &[u8],
) -> Result<()> {
    let io = |doing: &'static str| {
        move |e: std::io::Error| Error::new(ErrorKind::Connection, doing).with_source(e)
    };
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(io("connecting a raw NATS client"))?;
    let mut frame = Vec::new();
    frame.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\n",
    );
    frame.extend_from_slice(b"SUB _INBOX.raw.ack 1\r\n");
    match header_block {
        Some(block) => {
            frame.extend_from_slice(
                format!(
                    "HPUB {subject} _INBOX.raw.ack {} {}\r\n",
                    block.len(),
                    block.len() + payload.len()
                )
                .as_bytes(),
            );
            frame.extend_from_slice(block);
        }
        None => frame.extend_from_slice(
            format!("PUB {subject} _INBOX.raw.ack {}\r\n", payload.len()).as_bytes(),
        ),
    }
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\n");
    stream
        .write_all(&frame)
        .await
        .map_err(io("writing raw frames"))?;
    // The stream's acknowledgement arrives on the inbox: `{"stream":..,"seq":..}`.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no acknowledgement for the raw publish to `{subject}`: {}",
                        String::from_utf8_lossy(&seen)
                    ),
                )
            })?
            .map_err(io("reading the acknowledgement"))?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::Connection,
                "the server closed the raw connection",
            ));
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        // A refusal carries `"seq":0` too: the error is looked for first.
        if text.contains("\"error\"") || text.contains("-ERR") || text.contains(" 503") {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("the raw publish to `{subject}` was refused: {text}"),
            ));
        }
        if text.contains("\"seq\"") {
            return Ok(());
        }
    }
}

/// A raw AMQP connection (see [`ticketrail_rabbitmq::raw`]) to `url`.
pub async fn raw_amqp(url: &str) -> Result<RawConnection> {
    RawConnection::connect(url, Duration::from_secs(5)).await
}
