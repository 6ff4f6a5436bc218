//! The receive path of peer connections: where the driver reads the next
//! bytes, and what they are.
//!
//! A download connection's bytes are mostly block data. The engine lends the
//! driver two buffers per read ([`ClientEngine::peer_recv_bufs`]): first the
//! rest of the block being received, straight inside its chunk's buffer,
//! then free space in the connection's frame decoder for what follows (the
//! next block's header, other messages). So block data is copied once, by
//! the kernel, from the socket to its chunk. This is the one input outside
//! [`super::ClientInput`], for that reason.

use super::{ClientEngine, PeerLink};
use crate::client::download::{Download, PeerConnId};
use crate::client::peer::{Load, PeerMessage, MAX_PEER_FRAME};
use crate::identity::KeyId;
use crate::time::Millis;
use crate::wire::FrameDecoder;

/// Most receive space offered per read into a download connection's frame
/// decoder (for a long non-block frame such as a large chunk map).
const PEER_RECV_WINDOW: usize = 256 * 1024;
/// Receive space offered for what follows a block's data: enough for the
/// next block's header (and a short message or two), so that the next
/// block's data is read into its chunk rather than copied there.
const HEAD_WINDOW: usize = 64;

/// A block whose header has been read and whose data arrives next.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockStream {
    chunk: u32,
    /// Where the next data byte goes in the chunk.
    offset: u32,
    load: Load,
    /// Data bytes still to come.
    left: u32,
    /// The chunk no longer wants them (its fetch was cancelled meanwhile):
    /// they are read and dropped.
    discard: bool,
}

impl ClientEngine {
    /// Bytes arrived on a peer connection, as a copy.
    pub(super) fn peer_bytes(&mut self, conn: PeerConnId, mut bytes: &[u8], now: Millis) {
        while !bytes.is_empty() {
            let Some((data, frames)) = self.peer_recv_bufs(conn) else { return };
            let a = data.len().min(bytes.len());
            data[..a].copy_from_slice(&bytes[..a]);
            let b = frames.len().min(bytes.len() - a);
            frames[..b].copy_from_slice(&bytes[a..a + b]);
            self.handle_peer_received(conn, a + b, now);
            bytes = &bytes[a + b..];
        }
    }

    /// Where to read the next bytes of a peer connection, in order: first
    /// into `data` (possibly empty: the rest of the block being received,
    /// straight into its chunk's buffer), then into `frames` (free space in
    /// the connection's frame decoder; never empty). A read fills `data`
    /// before any byte goes to `frames` (`readv`). `None` if the connection
    /// is not known (any more). Report what was read with
    /// [`ClientEngine::handle_peer_received`].
    pub fn peer_recv_bufs(&mut self, conn: PeerConnId) -> Option<(&mut [u8], &mut [u8])> {
        match self.peers.get_mut(&conn)? {
            PeerLink::In(up) => Some((&mut [], super::serve::recv_window(up))),
            PeerLink::Out { download, decoder, stream } => {
                let dl = match self.downloads.get_mut(download) {
                    Some(e) => e.fetch_mut(),
                    None => None,
                };
                let Some(s) = stream else {
                    // A long frame that is not a block is read whole; the
                    // start of anything else just far enough to see where
                    // a block's data goes.
                    let window = match decoder.partial_frame() {
                        Some((len, held))
                            if held.len() < HEAD_WINDOW
                                && held.first().is_none_or(|&t| t == crate::client::peer::BLOCK_TAG)
                                && crate::client::peer::decode_block_head(len, held).is_none() =>
                        {
                            HEAD_WINDOW
                        }
                        Some((len, held)) => (len - held.len()).clamp(HEAD_WINDOW, PEER_RECV_WINDOW),
                        None => HEAD_WINDOW,
                    };
                    return Some((&mut [], decoder.recv_buf(window)));
                };
                let space = dl.and_then(|dl| dl.recv_space(conn, s.chunk, s.offset)).filter(|_| !s.discard);
                match space {
                    Some(space) => Some((&mut space[..s.left as usize], decoder.recv_buf(HEAD_WINDOW))),
                    None => {
                        s.discard = true;
                        Some((&mut [], decoder.recv_buf((s.left as usize).min(PEER_RECV_WINDOW))))
                    }
                }
            }
        }
    }

    /// `n` bytes were read into [`ClientEngine::peer_recv_bufs`]' spaces;
    /// then drain [`ClientEngine::poll_output`] as after any input.
    pub fn handle_peer_received(&mut self, conn: PeerConnId, n: usize, now: Millis) {
        match self.peers.get_mut(&conn) {
            None => {}
            Some(PeerLink::In(_)) => self.upload_received(conn, n, now),
            Some(PeerLink::Out { download, decoder, stream }) => {
                let id = *download;
                let Some(dl) = self.downloads.get_mut(&id).and_then(|e| e.fetch_mut()) else {
                    return decoder.commit(n);
                };
                match stream {
                    Some(s) if s.discard => {
                        decoder.commit(n);
                        let k = n.min(s.left as usize);
                        decoder.skip(k);
                        s.left -= k as u32;
                    }
                    Some(s) => {
                        let k = n.min(s.left as usize);
                        decoder.commit(n - k);
                        s.left -= k as u32;
                        let (chunk, offset, load) = (s.chunk, s.offset, s.load);
                        s.offset += k as u32;
                        if k > 0 {
                            dl.handle_block_landed(conn, chunk, offset, load, k as u32, now);
                        }
                    }
                    None => decoder.commit(n),
                }
                if stream.is_some_and(|s| s.left == 0) {
                    *stream = None;
                }
                let mut bad = false;
                while dl.owns(conn) {
                    let body = match decoder.next_frame() {
                        Ok(Some(body)) => body,
                        Ok(None) => {
                            // A block whose data is still on its way: take the
                            // data that came with its header, then receive
                            // the rest in place.
                            if stream.is_none() {
                                *stream = start_stream(dl, conn, decoder, now);
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(conn = conn.0, error = %e, "bad frame from a peer");
                            bad = true;
                            break;
                        }
                    };
                    // Blocks that arrived whole are read in place too.
                    if let Some(b) = crate::client::peer::decode_block(body) {
                        dl.handle_block(conn, b.chunk, b.offset, b.load, b.data, now);
                    } else {
                        match crate::wire::decode::<PeerMessage>(body) {
                            Ok(m) => dl.handle_message(conn, m, now),
                            Err(_) => {
                                bad = true;
                                break;
                            }
                        }
                    }
                }
                if bad && dl.owns(conn) {
                    dl.handle_closed(conn, now);
                    self.peers.remove(&conn);
                    self.out.push_back(super::ClientOutput::PeerClose { conn });
                }
                self.drain_download(id, now);
            }
        }
    }

    pub(super) fn peer_connected(&mut self, conn: PeerConnId, key: Option<KeyId>, now: Millis) {
        if let Some(PeerLink::Out { download, .. }) = self.peers.get(&conn) {
            let id = *download;
            if let Some(dl) = self.downloads.get_mut(&id).and_then(|e| e.fetch_mut()) {
                dl.handle_connected(conn, key, now);
            }
            self.drain_download(id, now);
        }
    }

    pub(super) fn peer_closed(&mut self, conn: PeerConnId, now: Millis) {
        match self.peers.remove(&conn) {
            Some(PeerLink::Out { download, .. }) => {
                if let Some(dl) = self.downloads.get_mut(&download).and_then(|e| e.fetch_mut()) {
                    dl.handle_closed(conn, now);
                }
                self.drain_download(download, now);
            }
            // An upload: what its downloader held and was offered is released.
            Some(link) => self.upload_gone(link),
            None => {}
        }
    }

    /// A download opens a connection: it is known as one of its own.
    pub(super) fn link_outgoing(&mut self, conn: PeerConnId, download: super::DownloadId) {
        let decoder = FrameDecoder::new(MAX_PEER_FRAME);
        self.peers.insert(conn, PeerLink::Out { download, decoder, stream: None });
    }
}

/// If the decoder holds the start of a block frame, header complete, whose
/// data `dl` expects next from `conn`: moves the data that came with the
/// header into the chunk and returns the stream for the rest. Otherwise
/// the frame stays in the decoder, to be handled whole.
fn start_stream(dl: &mut Download, conn: PeerConnId, decoder: &mut FrameDecoder, now: Millis) -> Option<BlockStream> {
    let (len, held) = decoder.partial_frame()?;
    let h = crate::client::peer::decode_block_head(len, held)?;
    let present = &held[h.header_len..];
    let space = dl.recv_space(conn, h.chunk, h.offset)?;
    if h.len == 0 || h.len as usize > space.len() {
        return None;
    }
    let k = present.len();
    space[..k].copy_from_slice(present);
    decoder.take_partial(h.header_len + k);
    if k > 0 {
        dl.handle_block_landed(conn, h.chunk, h.offset, h.load, k as u32, now);
    }
    let s = BlockStream {
        chunk: h.chunk,
        offset: h.offset + k as u32,
        load: h.load,
        left: h.len - k as u32,
        discard: false,
    };
    Some(s)
}
