//! Decoding the `pgoutput` logical replication protocol (version 1).
//!
//! Messages borrow from the bytes they were decoded from: tuple values are slices of the
//! replication buffer, never copies. A tuple is validated once when its message is decoded, so
//! iterating its values cannot fail. Arbitrary input yields a typed [`DecodeError`], never a
//! panic (see the property test below).

use std::fmt;

/// A malformed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field.
    #[error("pgoutput message truncated reading {0}")]
    Truncated(&'static str),
    /// The first byte is not a known message type.
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    /// A tuple column has an unknown kind byte.
    #[error("unknown tuple value kind {0:#04x}")]
    UnknownValueKind(u8),
    /// An Update or Delete names an unknown old-tuple kind.
    #[error("unexpected tuple marker {0:#04x}")]
    UnexpectedMarker(u8),
    /// A length field is negative.
    #[error("negative length {0}")]
    NegativeLength(i32),
    /// A string is not terminated or not UTF-8.
    #[error("bad string in {0}")]
    BadString(&'static str),
    /// Bytes remain after the message.
    #[error("{0} trailing bytes after a pgoutput message")]
    Trailing(usize),
}

/// A Log Sequence Number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Part of the replica identity (key).
    pub key: bool,
    /// Column name.
    pub name: &'a str,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A value in a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (its bytes are not sent).
    Unchanged,
    /// Text format bytes.
    Text(&'a [u8]),
    /// Binary format bytes (the type's send function).
    Binary(&'a [u8]),
}

/// The values of one row, validated at decode time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    columns: u16,
    raw: &'a [u8],
}

impl<'a> Tuple<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    /// Whether the tuple has no values.
    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    /// The values, in column order.
    pub fn values(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let mut reader = Reader::new(self.raw);
        (0..self.columns).map_while(move |_| read_value(&mut reader).ok())
    }
}

/// Which old values an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTuple<'a> {
    /// Only the replica identity (key) columns; others are Null.
    Key(Tuple<'a>),
    /// Every column (REPLICA IDENTITY FULL).
    Full(Tuple<'a>),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A transaction starts.
    Begin {
        /// LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction ends.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to acknowledge.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// The transaction was replicated from another origin.
    Origin {
        /// Commit LSN on the origin.
        commit_lsn: Lsn,
        /// Origin name.
        name: &'a str,
    },
    /// A table's definition (sent before its first change, and again after it changes).
    Relation {
        /// Relation oid.
        oid: u32,
        /// Schema.
        namespace: &'a str,
        /// Table name.
        name: &'a str,
        /// Replica identity setting ('d', 'n', 'f', 'i').
        replica_identity: u8,
        /// Columns as published.
        columns: Vec<RelationColumn<'a>>,
    },
    /// A type's name (for types not built in).
    Type {
        /// Type oid.
        oid: u32,
        /// Schema.
        namespace: &'a str,
        /// Type name.
        name: &'a str,
    },
    /// A row was inserted.
    Insert {
        /// Relation oid.
        relation: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A row was updated.
    Update {
        /// Relation oid.
        relation: u32,
        /// The old key or row, when the key changed or identity is FULL.
        old: Option<OldTuple<'a>>,
        /// The new row (unchanged TOAST values marked [`Value::Unchanged`]).
        new: Tuple<'a>,
    },
    /// A row was deleted.
    Delete {
        /// Relation oid.
        relation: u32,
        /// The old key or row.
        old: OldTuple<'a>,
    },
    /// Tables were truncated.
    Truncate {
        /// CASCADE (1) and RESTART IDENTITY (2) bits.
        options: u8,
        /// Relation oids.
        relations: Vec<u32>,
    },
    /// A `pg_logical_emit_message`.
    LogicalMessage {
        /// Emitted inside a transaction.
        transactional: bool,
        /// Its LSN.
        lsn: Lsn,
        /// Prefix.
        prefix: &'a str,
        /// Content.
        content: &'a [u8],
    },
}

/// Decodes one pgoutput message.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader::new(bytes);
    let message = match r.u8("message type")? {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("final lsn")?),
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => {
            let _flags = r.u8("commit flags")?;
            Message::Commit {
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("end lsn")?),
                commit_time: r.i64("commit time")?,
            }
        }
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("origin lsn")?),
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(count.min(1600)));
            for _ in 0..count {
                columns.push(RelationColumn {
                    key: r.u8("column flags")? & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column typmod")?,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation oid")?;
            expect(&mut r, b'N')?;
            Message::Insert {
                relation,
                new: read_tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let (old, marker) = match r.u8("update marker")? {
                b'K' => (
                    Some(OldTuple::Key(read_tuple(&mut r)?)),
                    r.u8("update marker")?,
                ),
                b'O' => (
                    Some(OldTuple::Full(read_tuple(&mut r)?)),
                    r.u8("update marker")?,
                ),
                other => (None, other),
            };
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker));
            }
            Message::Update {
                relation,
                old,
                new: read_tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("delete marker")? {
                b'K' => OldTuple::Key(read_tuple(&mut r)?),
                b'O' => OldTuple::Full(read_tuple(&mut r)?),
                other => return Err(DecodeError::UnexpectedMarker(other)),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let count = r.u32("truncate count")?;
            let options = r.u8("truncate options")?;
            // Bounded by the bytes present, so a forged count cannot allocate much.
            let mut relations = Vec::with_capacity((r.remaining() / 4).min(count as usize));
            for _ in 0..count {
                relations.push(r.u32("truncated relation")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = Lsn(r.u64("message lsn")?);
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")?;
            let content = r.take(len as usize, "message content")?;
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::Trailing(r.remaining()));
    }
    Ok(message)
}

fn expect(r: &mut Reader<'_>, marker: u8) -> Result<(), DecodeError> {
    match r.u8("tuple marker")? {
        m if m == marker => Ok(()),
        other => Err(DecodeError::UnexpectedMarker(other)),
    }
}

/// Reads and validates TupleData; the tuple keeps the raw bytes for zero-copy iteration.
fn read_tuple<'a>(r: &mut Reader<'a>) -> Result<Tuple<'a>, DecodeError> {
    let columns = r.u16("tuple column count")?;
    let start = r.0;
    for _ in 0..columns {
        read_value(r)?;
    }
    let used = start.len() - r.0.len();
    Ok(Tuple {
        columns,
        raw: &start[..used],
    })
}

fn read_value<'a>(r: &mut Reader<'a>) -> Result<Value<'a>, DecodeError> {
    match r.u8("value kind")? {
        b'n' => Ok(Value::Null),
        b'u' => Ok(Value::Unchanged),
        kind @ (b't' | b'b') => {
            let len = r.i32("value length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength(len))?;
            let bytes = r.take(len, "value")?;
            Ok(if kind == b't' {
                Value::Text(bytes)
            } else {
                Value::Binary(bytes)
            })
        }
        other => Err(DecodeError::UnknownValueKind(other)),
    }
}

/// A checked cursor.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    fn remaining(&self) -> usize {
        self.0.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn cstr(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::BadString(what))?;
        let text = std::str::from_utf8(&self.0[..end]).map_err(|_| DecodeError::BadString(what))?;
        self.0 = &self.0[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages the way Postgres sends them (test helper).
    struct W(Vec<u8>);

    impl W {
        fn new(kind: u8) -> Self {
            Self(vec![kind])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn value(mut self, kind: u8, bytes: &[u8]) -> Self {
            self.0.push(kind);
            if kind == b't' || kind == b'b' {
                self.0
                    .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                self.0.extend_from_slice(bytes);
            }
            self
        }
    }

    fn corpus() -> Vec<Vec<u8>> {
        vec![
            W::new(b'B').u64(0x16B_3748).u64(7).u32(42).0,
            W::new(b'C').u8(0).u64(0x16B_3748).u64(0x16B_3778).u64(7).0,
            W::new(b'O').u64(9).s("upstream").0,
            W::new(b'R')
                .u32(16_384)
                .s("public")
                .s("orders")
                .u8(b'd')
                .u16(2)
                .u8(1)
                .s("id")
                .u32(20)
                .u32(u32::MAX)
                .u8(0)
                .s("note")
                .u32(25)
                .u32(u32::MAX)
                .0,
            W::new(b'Y').u32(90_000).s("public").s("mood").0,
            W::new(b'I')
                .u32(16_384)
                .u8(b'N')
                .u16(2)
                .value(b'b', &7i64.to_be_bytes())
                .value(b'n', &[])
                .0,
            W::new(b'U')
                .u32(16_384)
                .u8(b'K')
                .u16(2)
                .value(b'b', &7i64.to_be_bytes())
                .value(b'n', &[])
                .u8(b'N')
                .u16(2)
                .value(b'b', &8i64.to_be_bytes())
                .value(b'u', &[])
                .0,
            W::new(b'U')
                .u32(16_384)
                .u8(b'N')
                .u16(2)
                .value(b't', b"8")
                .value(b't', b"hello")
                .0,
            W::new(b'D')
                .u32(16_384)
                .u8(b'O')
                .u16(2)
                .value(b't', b"8")
                .value(b't', b"x")
                .0,
            W::new(b'T').u32(2).u8(1).u32(16_384).u32(16_390).0,
            W::new(b'M')
                .u8(1)
                .u64(5)
                .s("ferry_heartbeat")
                .u32(2)
                .0
                .into_iter()
                .chain([b'h', b'i'])
                .collect(),
        ]
    }

    #[test]
    fn decodes_every_message_kind() {
        let decoded: Vec<_> = corpus()
            .iter()
            .map(|m| decode(m).map(|m| format!("{m:?}")))
            .collect();
        assert!(decoded.iter().all(Result::is_ok), "{decoded:?}");
        let update = &corpus()[6];
        let Message::Update {
            relation,
            old: Some(OldTuple::Key(old)),
            new,
        } = decode(update).unwrap()
        else {
            panic!("not an update with key");
        };
        assert_eq!(relation, 16_384);
        assert_eq!(
            old.values().collect::<Vec<_>>(),
            [Value::Binary(&7i64.to_be_bytes()), Value::Null]
        );
        assert_eq!(
            new.values().collect::<Vec<_>>(),
            [Value::Binary(&8i64.to_be_bytes()), Value::Unchanged]
        );
        let seeds = corpus();
        let commit = decode(&seeds[1]).unwrap();
        assert_eq!(
            commit,
            Message::Commit {
                commit_lsn: Lsn(0x16B_3748),
                end_lsn: Lsn(0x16B_3778),
                commit_time: 7
            }
        );
        assert_eq!(Lsn(0x1_0000_00A0).to_string(), "1/A0");
        let Message::Relation { columns, .. } = decode(&seeds[3]).unwrap() else {
            panic!()
        };
        assert!(columns[0].key && !columns[1].key);
        assert_eq!(columns[0].type_modifier, -1);
    }

    /// xorshift64*: a deterministic stream of pseudo-random numbers.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Property: for any bytes — random, or a valid message truncated, extended or with bytes
    /// flipped — `decode` returns a value or a typed error and never panics; whatever it
    /// accepts iterates cleanly.
    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let seeds = corpus();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..200_000 {
            let mut bytes = if round % 4 == 0 {
                let len = rng.below(64);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                seeds[rng.below(seeds.len())].clone()
            };
            match rng.below(4) {
                0 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len())),
                1 if !bytes.is_empty() => {
                    for _ in 0..=rng.below(4) {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                }
                2 => bytes.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                _ => {}
            }
            if let Ok(message) = decode(&bytes) {
                match message {
                    Message::Insert { new, .. } | Message::Update { new, .. } => {
                        assert_eq!(new.values().count(), new.len());
                    }
                    Message::Delete {
                        old: OldTuple::Key(t) | OldTuple::Full(t),
                        ..
                    } => {
                        assert_eq!(t.values().count(), t.len());
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn typed_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated("message type")));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        let mut insert = corpus()[5].clone();
        insert.push(0);
        assert_eq!(decode(&insert), Err(DecodeError::Trailing(1)));
        let bad_kind = W::new(b'I').u32(1).u8(b'N').u16(1).u8(b'x').0;
        assert_eq!(decode(&bad_kind), Err(DecodeError::UnknownValueKind(b'x')));
        let negative = W::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX - 1)
            .0;
        assert_eq!(decode(&negative), Err(DecodeError::NegativeLength(-2)));
        let forged_truncate = W::new(b'T').u32(u32::MAX).u8(0).0;
        assert_eq!(
            decode(&forged_truncate),
            Err(DecodeError::Truncated("truncated relation"))
        );
    }
}
