//! Decoding `COPY … TO STDOUT (FORMAT binary)`.
//!
//! Chunks from the server are appended to one buffer; every complete tuple in it is handed to
//! the caller as borrowed field slices, and the consumed bytes are dropped before the next
//! chunk, so memory is bounded by the largest tuple plus one chunk.

/// The 11-byte signature every binary COPY stream starts with.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// A malformed COPY stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The stream does not start with the binary COPY signature.
    #[error("not a binary COPY stream")]
    Signature,
    /// A tuple has a field count other than the table's.
    #[error("tuple has {got} fields, expected {expected}")]
    FieldCount {
        /// Fields in the tuple.
        got: i16,
        /// Columns expected.
        expected: usize,
    },
    /// A negative length other than -1 (NULL).
    #[error("bad field length {0}")]
    FieldLength(i32),
    /// The stream ended inside a tuple or without its trailer.
    #[error("COPY stream ended early")]
    Truncated,
    /// Bytes after the trailer.
    #[error("data after the end of the COPY stream")]
    TrailingData,
}

/// Incremental decoder of one binary COPY stream with a known column count.
#[derive(Debug)]
pub struct CopyDecoder {
    buffer: Vec<u8>,
    columns: usize,
    header_done: bool,
    finished: bool,
    fields: Vec<Option<(usize, usize)>>,
}

/// Why decoding rows stopped: the stream was bad, or the caller's row handler failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError<E> {
    /// The stream is malformed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// The row handler failed.
    #[error("row handler failed")]
    Row(#[source] E),
}

/// The fields of one tuple; `None` is SQL NULL.
#[derive(Debug)]
pub struct Fields<'a> {
    buffer: &'a [u8],
    fields: std::slice::Iter<'a, Option<(usize, usize)>>,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        let field = self.fields.next()?;
        Some(field.map(|(start, end)| &self.buffer[start..end]))
    }
}

impl CopyDecoder {
    /// A decoder for tuples of `columns` fields.
    pub fn new(columns: usize) -> Self {
        Self {
            buffer: Vec::with_capacity(64 * 1024),
            columns,
            header_done: false,
            finished: false,
            fields: Vec::with_capacity(columns),
        }
    }

    /// Appends a chunk and hands every complete tuple to `on_row`. Returns the number of rows.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut on_row: impl FnMut(Fields<'_>) -> Result<(), E>,
    ) -> Result<u64, DecodeError<E>> {
        if self.finished {
            return if chunk.is_empty() {
                Ok(0)
            } else {
                Err(CopyError::TrailingData.into())
            };
        }
        self.buffer.extend_from_slice(chunk);
        let mut at = 0;
        if !self.header_done {
            match parse_header(&self.buffer)? {
                Some(len) => {
                    at = len;
                    self.header_done = true;
                }
                None => return Ok(0),
            }
        }
        let mut rows = 0;
        while let Some(count) = read_i16(&self.buffer, at) {
            if count == -1 {
                self.finished = true;
                at += 2;
                if at != self.buffer.len() {
                    return Err(CopyError::TrailingData.into());
                }
                break;
            }
            if usize::try_from(count).ok() != Some(self.columns) {
                return Err(CopyError::FieldCount {
                    got: count,
                    expected: self.columns,
                }
                .into());
            }
            // Locate every field; stop if the tuple is not complete yet.
            self.fields.clear();
            let mut cursor = at + 2;
            let mut complete = true;
            for _ in 0..self.columns {
                let Some(len) = read_i32(&self.buffer, cursor) else {
                    complete = false;
                    break;
                };
                cursor += 4;
                if len == -1 {
                    self.fields.push(None);
                    continue;
                }
                let len = usize::try_from(len).map_err(|_| CopyError::FieldLength(len))?;
                if cursor + len > self.buffer.len() {
                    complete = false;
                    break;
                }
                self.fields.push(Some((cursor, cursor + len)));
                cursor += len;
            }
            if !complete {
                break;
            }
            on_row(Fields {
                buffer: &self.buffer,
                fields: self.fields.iter(),
            })
            .map_err(DecodeError::Row)?;
            rows += 1;
            at = cursor;
        }
        self.buffer.drain(..at);
        Ok(rows)
    }

    /// Checks that the stream ended cleanly (trailer seen, nothing left over).
    pub fn finish(&self) -> Result<(), CopyError> {
        if self.finished && self.buffer.is_empty() {
            Ok(())
        } else {
            Err(CopyError::Truncated)
        }
    }
}

fn read_i16(buffer: &[u8], at: usize) -> Option<i16> {
    buffer
        .get(at..at + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
}

fn read_i32(buffer: &[u8], at: usize) -> Option<i32> {
    buffer
        .get(at..at + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The header's length once it is complete.
fn parse_header(buffer: &[u8]) -> Result<Option<usize>, CopyError> {
    let prefix = buffer.len().min(SIGNATURE.len());
    if buffer[..prefix] != SIGNATURE[..prefix] {
        return Err(CopyError::Signature);
    }
    // Signature, flags (i32), extension length (i32), extension.
    let Some(extension) = read_i32(buffer, SIGNATURE.len() + 4) else {
        return Ok(None);
    };
    let extension = usize::try_from(extension).map_err(|_| CopyError::FieldLength(extension))?;
    let len = SIGNATURE.len() + 8 + extension;
    Ok((buffer.len() >= len).then_some(len))
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&[0; 8]);
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for field in *row {
                match field {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn decode_in_chunks(
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<Vec<Option<Vec<u8>>>>, CopyError> {
        let mut decoder = CopyDecoder::new(2);
        let mut rows = Vec::new();
        for piece in bytes.chunks(chunk) {
            decoder
                .feed(piece, |fields| {
                    rows.push(fields.map(|f| f.map(<[u8]>::to_vec)).collect());
                    Ok::<_, ()>(())
                })
                .map_err(|e| match e {
                    DecodeError::Copy(c) => c,
                    DecodeError::Row(()) => unreachable!(),
                })?;
        }
        decoder.finish()?;
        Ok(rows)
    }

    #[test]
    fn any_chunking_gives_the_same_rows() {
        let bytes = stream(&[&[Some(b"a"), None], &[Some(b""), Some(b"longer value")]]);
        let expected = decode_in_chunks(&bytes, bytes.len()).unwrap();
        assert_eq!(expected.len(), 2);
        assert_eq!(expected[0], vec![Some(b"a".to_vec()), None]);
        for chunk in 1..bytes.len() {
            assert_eq!(
                decode_in_chunks(&bytes, chunk).unwrap(),
                expected,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn malformed_streams_are_errors() {
        let good = stream(&[&[Some(b"a"), None]]);
        assert_eq!(
            decode_in_chunks(&good[..good.len() - 1], 7),
            Err(CopyError::Truncated)
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode_in_chunks(&bad, 100), Err(CopyError::Signature));
        let three = stream(&[&[None, None, None]]);
        assert!(matches!(
            decode_in_chunks(&three, 100),
            Err(CopyError::FieldCount { .. })
        ));
        let mut negative = stream(&[&[Some(b"a"), None]]);
        let at = 19 + 2;
        negative[at..at + 4].copy_from_slice(&(-7i32).to_be_bytes());
        assert_eq!(
            decode_in_chunks(&negative, 100),
            Err(CopyError::FieldLength(-7))
        );
        let mut trailing = good;
        trailing.push(0);
        assert_eq!(
            decode_in_chunks(&trailing, 100),
            Err(CopyError::TrailingData)
        );
    }
}
