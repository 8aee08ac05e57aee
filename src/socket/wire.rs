//! The WebSocket wire format, server side (RFC 6455): the frames the service sends, encoded once
//! per event (server frames are unmasked, so the bytes are the same for every socket), and a
//! bounded parser for the frames a POS sends (always masked, at most a few KiB).

use bytes::{BufMut, Bytes, BytesMut};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const MASKED: u8 = 0x80;
/// Largest payload of a control frame (RFC 6455, 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A ping with no payload: what the service sends to check a POS is alive.
pub(crate) const PING: Bytes = Bytes::from_static(&[FIN | OP_PING, 0]);

/// A complete, unmasked text frame holding `payload`.
pub(crate) fn text_frame(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// The pong answering a ping with this payload (at most 125 bytes, as the ping's was).
pub(crate) fn pong_frame(payload: &[u8]) -> Bytes {
    frame(OP_PONG, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
}

/// A close frame with a status code and a reason (cut to fit a control frame).
pub(crate) fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(OP_CLOSE, &payload)
}

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(FIN | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// One message from a POS.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A complete text message (valid UTF-8), e.g. an ack.
    Text(String),
    /// A complete binary message (POS clients have no use for them; ignored).
    Binary,
    /// A ping; answer with a pong carrying the payload.
    Ping(Bytes),
    /// A pong (to our ping).
    Pong,
    /// The POS closes the connection.
    Close,
}

/// Why the frames a POS sent cannot be read: the socket is closed without further ado.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// A frame breaks RFC 6455 (unmasked, reserved bits, unknown opcode, bad fragmentation,
    /// invalid UTF-8, an oversized control frame).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A frame or message is larger than the service accepts from a POS.
    #[error("message larger than {0} bytes")]
    TooBig(usize),
}

/// Reassembles the frames a POS sends into messages, holding at most one message of
/// `max_message` bytes plus one read's worth of bytes. Idle, it holds no allocation.
#[derive(Debug)]
pub(crate) struct Reader {
    max_message: usize,
    /// Bytes received and not yet parsed.
    buf: BytesMut,
    /// The data message in progress (its first frame had no FIN), and its opcode.
    message: Vec<u8>,
    message_opcode: Option<u8>,
}

impl Reader {
    /// A reader accepting messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            buf: BytesMut::new(),
            message: Vec::new(),
            message_opcode: None,
        }
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if the bytes received so far hold one.
    pub(crate) fn next_message(&mut self) -> Result<Option<Incoming>, WireError> {
        loop {
            let Some((opcode, fin, payload)) = self.next_frame()? else {
                if self.buf.is_empty() {
                    // Give back what a burst grew the buffer to: an idle socket holds nothing.
                    self.buf = BytesMut::new();
                }
                return Ok(None);
            };
            match opcode {
                OP_PING => return Ok(Some(Incoming::Ping(payload))),
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => return Ok(Some(Incoming::Close)),
                OP_TEXT | OP_BINARY => {
                    if self.message_opcode.is_some() {
                        return Err(WireError::Protocol("a new message inside a fragmented one"));
                    }
                    if fin {
                        return Ok(Some(complete(opcode, payload.to_vec())?));
                    }
                    self.message_opcode = Some(opcode);
                    self.message.extend_from_slice(&payload);
                }
                OP_CONTINUATION => {
                    let Some(first) = self.message_opcode else {
                        return Err(WireError::Protocol("a continuation frame with no message"));
                    };
                    if self.message.len() + payload.len() > self.max_message {
                        return Err(WireError::TooBig(self.max_message));
                    }
                    self.message.extend_from_slice(&payload);
                    if fin {
                        self.message_opcode = None;
                        let message = std::mem::take(&mut self.message);
                        return Ok(Some(complete(first, message)?));
                    }
                }
                _ => return Err(WireError::Protocol("unknown opcode")),
            }
        }
    }

    /// Takes one complete frame off the buffer: (opcode, FIN, unmasked payload).
    fn next_frame(&mut self) -> Result<Option<(u8, bool, Bytes)>, WireError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (b[0], b[1]);
        if first & 0x70 != 0 {
            return Err(WireError::Protocol(
                "reserved bits set (no extension was agreed)",
            ));
        }
        if second & MASKED == 0 {
            return Err(WireError::Protocol("an unmasked frame from a client"));
        }
        let opcode = first & 0x0F;
        let fin = first & FIN != 0;
        let (len, header) = match second & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if opcode >= OP_CLOSE {
            if !fin {
                return Err(WireError::Protocol("a fragmented control frame"));
            }
            if len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(WireError::Protocol("a control frame over 125 bytes"));
            }
        }
        // Refused from the header alone, before any of it is buffered.
        if len > self.max_message as u64 {
            return Err(WireError::TooBig(self.max_message));
        }
        let len = len as usize;
        let total = header + 4 + len;
        if b.len() < total {
            return Ok(None);
        }
        let mask = [b[header], b[header + 1], b[header + 2], b[header + 3]];
        let mut frame = self.buf.split_to(total);
        let mut payload = frame.split_off(header + 4);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        Ok(Some((opcode, fin, payload.freeze())))
    }
}

fn complete(opcode: u8, payload: Vec<u8>) -> Result<Incoming, WireError> {
    if opcode == OP_BINARY {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| WireError::Protocol("a text message that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(MASKED | n as u8),
            n if n <= 0xFFFF => {
                out.push(MASKED | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(MASKED | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn server_frames_have_the_shortest_length_encoding() {
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let mid = text_frame(&[b'x'; 200]);
        assert_eq!(&mid[..4], &[0x81, 126, 0, 200]);
        let big = text_frame(&vec![b'x'; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(big.len(), 70_000 + 10);
        assert_eq!(&PING[..], &[0x89, 0]);
        let close = close_frame(1013, "too slow");
        assert_eq!(&close[..4], &[0x88, 10, 0x03, 0xF5]);
        assert_eq!(close_frame(1000, &"é".repeat(200)).len(), 2 + 124);
    }

    #[test]
    fn messages_are_reassembled_across_reads_and_fragments() {
        let mut r = Reader::new(4096);
        let ack = client_frame(FIN | OP_TEXT, br#"{"type":"ack","id":4}"#);
        // Byte by byte: nothing until the frame is whole.
        for (i, b) in ack.iter().enumerate() {
            r.feed(&[*b]);
            let got = r.next_message().unwrap();
            assert_eq!(got.is_some(), i == ack.len() - 1);
        }
        let mut two = client_frame(OP_TEXT, b"hel");
        two.extend(client_frame(FIN | OP_PING, b"p"));
        two.extend(client_frame(FIN | OP_CONTINUATION, b"lo"));
        r.feed(&two);
        assert_eq!(
            r.next_message().unwrap(),
            Some(Incoming::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            r.next_message().unwrap(),
            Some(Incoming::Text("hello".into()))
        );
        assert_eq!(r.next_message().unwrap(), None);
        assert_eq!(r.buf.capacity(), 0, "an idle reader holds nothing");
    }

    #[test]
    fn hostile_frames_are_refused() {
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (
                vec![FIN | OP_TEXT, 2, b'h', b'i'],
                WireError::Protocol("an unmasked frame from a client"),
            ),
            (
                client_frame(FIN | 0x40 | OP_TEXT, b"x"),
                WireError::Protocol("reserved bits set (no extension was agreed)"),
            ),
            (
                client_frame(FIN | 0x3, b"x"),
                WireError::Protocol("unknown opcode"),
            ),
            (
                client_frame(OP_PING, b"x"),
                WireError::Protocol("a fragmented control frame"),
            ),
            (
                client_frame(FIN | OP_PING, &[0; 126]),
                WireError::Protocol("a control frame over 125 bytes"),
            ),
            (
                client_frame(FIN | OP_CONTINUATION, b"x"),
                WireError::Protocol("a continuation frame with no message"),
            ),
            (
                client_frame(FIN | OP_TEXT, &[0xff, 0xfe]),
                WireError::Protocol("a text message that is not UTF-8"),
            ),
            (
                client_frame(FIN | OP_TEXT, &[b'a'; 5000]),
                WireError::TooBig(4096),
            ),
        ];
        for (bytes, want) in cases {
            let mut r = Reader::new(4096);
            r.feed(&bytes);
            assert_eq!(r.next_message(), Err(want), "{bytes:?}");
        }
        // A lying length is refused from its header, before the payload arrives.
        let mut r = Reader::new(4096);
        r.feed(&[
            FIN | OP_TEXT,
            MASKED | 127,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
        ]);
        assert_eq!(r.next_message(), Err(WireError::TooBig(4096)));
        // Fragments that add up to too much.
        let mut r = Reader::new(4096);
        r.feed(&client_frame(OP_TEXT, &[b'a'; 3000]));
        r.feed(&client_frame(FIN | OP_CONTINUATION, &[b'a'; 3000]));
        assert_eq!(r.next_message(), Err(WireError::TooBig(4096)));
        // A new message inside a fragmented one.
        let mut r = Reader::new(4096);
        r.feed(&client_frame(OP_TEXT, b"a"));
        r.feed(&client_frame(FIN | OP_TEXT, b"b"));
        assert!(r.next_message().is_err());
    }
}
