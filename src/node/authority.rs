//! kubelet's plugin watcher dials the registration socket with grpc-go and
//! no authority override, so its requests carry the socket path,
//! percent-encoded, as the HTTP/2 `:authority` (`%2Fvar%2Flib%2Fkubelet...`).
//! That is not a valid authority, and h2 (under tonic) resets such streams
//! with PROTOCOL_ERROR before any service sees them. kubelet's CSI calls set
//! `localhost` instead, which is what every request is given here.
//!
//! Each accepted connection is relayed through a socket pair: bytes from
//! the server go back untouched; from the client, HEADERS and CONTINUATION
//! frames are decoded (HPACK), `:authority` is replaced, and the block is
//! re-encoded as one HEADERS frame. Every other frame passes unchanged.

use std::io;

use fluke_hpack::{Decoder, Encoder};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const PREFACE_LEN: usize = 24;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have; we never exceed it.
const MAX_FRAME: usize = 16_384;
const AUTHORITY: &[u8] = b"localhost";

/// Accepted connections, each already relayed through the rewriter.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let next = match listener.accept().await {
            Ok((client, _)) => relay(client),
            Err(e) => Err(e),
        };
        Some((next, listener))
    })
}

fn relay(client: UnixStream) -> io::Result<UnixStream> {
    let (server_side, ours) = UnixStream::pair()?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut ours_read, mut ours_write) = ours.into_split();
    tokio::spawn(async move {
        let upstream = rewrite_requests(&mut client_read, &mut ours_write);
        let downstream = tokio::io::copy(&mut ours_read, &mut client_write);
        // Either side closing ends the connection.
        tokio::select! {
            res = upstream => if let Err(e) = res { tracing::debug!(error = %e, "client connection ended") },
            _ = downstream => {}
        }
    });
    Ok(server_side)
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame<R: AsyncReadExt + Unpin>(from: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    from.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream,
        payload,
    }))
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header block fragment of a HEADERS frame, without padding or priority.
fn fragment(frame: &Frame) -> io::Result<&[u8]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HEADERS frame");
    let mut p = frame.payload.as_slice();
    let mut pad = 0;
    if frame.flags & FLAG_PADDED != 0 {
        pad = *p.first().ok_or_else(bad)? as usize;
        p = &p[1..];
    }
    if frame.flags & FLAG_PRIORITY != 0 {
        p = p.get(5..).ok_or_else(bad)?;
    }
    p.get(..p.len().checked_sub(pad).ok_or_else(bad)?)
        .ok_or_else(bad)
}

/// Re-encodes a header block with `:authority` set to localhost, as
/// HEADERS (+ CONTINUATION) frames.
pub(crate) fn rewrite_block(
    decoder: &mut Decoder,
    encoder: &mut Encoder,
    stream: u32,
    end_stream: bool,
    block: &[u8],
) -> io::Result<Vec<u8>> {
    let headers = decoder
        .decode(block)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
    let headers = headers.into_iter().map(|(name, value)| {
        let value = if name == b":authority" {
            AUTHORITY.to_vec()
        } else {
            value
        };
        (name, value)
    });
    let headers: Vec<_> = headers.collect();
    let encoded = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if encoded.is_empty() {
        vec![&[]]
    } else {
        encoded.chunks(MAX_FRAME).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, mut flags) = if i == 0 {
            (FRAME_HEADERS, 0)
        } else {
            (FRAME_CONTINUATION, 0)
        };
        if i == 0 && end_stream {
            flags |= FLAG_END_STREAM;
        }
        if last {
            flags |= FLAG_END_HEADERS;
        }
        out.extend(frame_bytes(kind, flags, stream, chunk));
    }
    Ok(out)
}

async fn rewrite_requests<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut preface = [0u8; PREFACE_LEN];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut encoder = Encoder::new();
    // A header block split over CONTINUATION frames: (stream, end_stream, bytes).
    let mut pending: Option<(u32, bool, Vec<u8>)> = None;
    while let Some(frame) = read_frame(from).await? {
        match frame.kind {
            FRAME_HEADERS => {
                let block = fragment(&frame)?.to_vec();
                let end_stream = frame.flags & FLAG_END_STREAM != 0;
                if frame.flags & FLAG_END_HEADERS != 0 {
                    to.write_all(&rewrite_block(
                        &mut decoder,
                        &mut encoder,
                        frame.stream,
                        end_stream,
                        &block,
                    )?)
                    .await?;
                } else {
                    pending = Some((frame.stream, end_stream, block));
                }
            }
            FRAME_CONTINUATION => {
                let Some((stream, end_stream, mut block)) = pending.take() else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "CONTINUATION without HEADERS",
                    ));
                };
                block.extend_from_slice(&frame.payload);
                if frame.flags & FLAG_END_HEADERS != 0 {
                    to.write_all(&rewrite_block(
                        &mut decoder,
                        &mut encoder,
                        stream,
                        end_stream,
                        &block,
                    )?)
                    .await?;
                } else {
                    pending = Some((stream, end_stream, block));
                }
            }
            kind => {
                to.write_all(&frame_bytes(
                    kind,
                    frame.flags,
                    frame.stream,
                    &frame.payload,
                ))
                .await?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_is_replaced_and_the_rest_kept() {
        let mut client = Encoder::new();
        let block = client.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/pluginregistration.Registration/GetInfo"),
            (
                b":authority",
                b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fx-reg.sock",
            ),
            (b"content-type", b"application/grpc"),
        ]);
        let (mut decoder, mut encoder) = (Decoder::new(), Encoder::new());
        let out = rewrite_block(&mut decoder, &mut encoder, 1, false, &block).unwrap();
        assert_eq!(out[3], FRAME_HEADERS);
        assert_eq!(out[4], FLAG_END_HEADERS);
        let headers = Decoder::new().decode(&out[9..]).unwrap();
        let get = |n: &[u8]| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get(b":authority").unwrap(), b"localhost");
        assert_eq!(
            get(b":path").unwrap(),
            b"/pluginregistration.Registration/GetInfo"
        );
        assert_eq!(headers.len(), 5);
    }
}
