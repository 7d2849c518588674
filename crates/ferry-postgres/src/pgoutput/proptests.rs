//! Property tests of [`decode`]: messages generated from an owned model and encoded the way
//! Postgres sends them decode back to the model, and no input (random, or a valid message cut
//! short or corrupted) makes it panic.
//!
//! 2048 cases a test; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// An owned tuple value, to compare with what [`decode`] borrows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Null,
    Unchanged,
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Old {
    Key(Vec<Val>),
    Full(Vec<Val>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    flags: u8,
    name: String,
    type_oid: u32,
    type_modifier: i32,
}

/// What a message carries, owned; flag bytes are kept whole so the test can check that the
/// decoder reads only the bits it documents.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation {
        oid: u32,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<Column>,
    },
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Val>,
    },
    Update {
        relation: u32,
        old: Option<Old>,
        new: Vec<Val>,
    },
    Delete {
        relation: u32,
        old: Old,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        flags: u8,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A C string of any characters but NUL.
fn cstring() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn value() -> impl Strategy<Value = Val> {
    prop_oneof![
        Just(Val::Null),
        Just(Val::Unchanged),
        vec(any::<u8>(), 0..24).prop_map(Val::Text),
        vec(any::<u8>(), 0..24).prop_map(Val::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Vec<Val>> {
    vec(value(), 0..8)
}

fn old() -> impl Strategy<Value = Old> {
    prop_oneof![tuple().prop_map(Old::Key), tuple().prop_map(Old::Full)]
}

fn message() -> impl Strategy<Value = Msg> {
    let column = (any::<u8>(), cstring(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Msg::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| Msg::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            }
        ),
        (any::<u64>(), cstring()).prop_map(|(commit_lsn, name)| Msg::Origin { commit_lsn, name }),
        (
            any::<u32>(),
            cstring(),
            cstring(),
            prop::sample::select(b"dnfi".to_vec()),
            vec(column, 0..6),
        )
            .prop_map(
                |(oid, namespace, name, replica_identity, columns)| Msg::Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                }
            ),
        (any::<u32>(), cstring(), cstring()).prop_map(|(oid, namespace, name)| Msg::Type {
            oid,
            namespace,
            name
        }),
        (any::<u32>(), tuple()).prop_map(|(relation, new)| Msg::Insert { relation, new }),
        (any::<u32>(), prop::option::of(old()), tuple())
            .prop_map(|(relation, old, new)| Msg::Update { relation, old, new }),
        (any::<u32>(), old()).prop_map(|(relation, old)| Msg::Delete { relation, old }),
        (any::<u8>(), vec(any::<u32>(), 0..8))
            .prop_map(|(options, relations)| Msg::Truncate { options, relations }),
        (
            any::<u8>(),
            any::<u64>(),
            cstring(),
            vec(any::<u8>(), 0..32)
        )
            .prop_map(|(flags, lsn, prefix, content)| Msg::Message {
                flags,
                lsn,
                prefix,
                content,
            }),
    ]
}

/// Encodes `msg` as pgoutput (protocol version 1) does.
fn encode(msg: &Msg) -> Vec<u8> {
    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    fn tuple(out: &mut Vec<u8>, values: &[Val]) {
        let count = u16::try_from(values.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for value in values {
            let (kind, bytes) = match value {
                Val::Null => (b'n', None),
                Val::Unchanged => (b'u', None),
                Val::Text(b) => (b't', Some(b)),
                Val::Binary(b) => (b'b', Some(b)),
            };
            out.push(kind);
            if let Some(bytes) = bytes {
                let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
    fn old(out: &mut Vec<u8>, old: &Old) {
        let (marker, values) = match old {
            Old::Key(v) => (b'K', v),
            Old::Full(v) => (b'O', v),
        };
        out.push(marker);
        tuple(out, values);
    }
    let mut out = Vec::new();
    match msg {
        Msg::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        Msg::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.extend_from_slice(&[b'C', *flags]);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
        }
        Msg::Origin { commit_lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            cstr(&mut out, name);
        }
        Msg::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            out.push(b'R');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
            out.push(*replica_identity);
            let count = u16::try_from(columns.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&count.to_be_bytes());
            for c in columns {
                out.push(c.flags);
                cstr(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Msg::Type {
            oid,
            namespace,
            name,
        } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
        }
        Msg::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        Msg::Update {
            relation,
            old: before,
            new,
        } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            if let Some(before) = before {
                old(&mut out, before);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        Msg::Delete {
            relation,
            old: before,
        } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            old(&mut out, before);
        }
        Msg::Truncate { options, relations } => {
            out.push(b'T');
            let count = u32::try_from(relations.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_be_bytes());
            out.push(*options);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Msg::Message {
            flags,
            lsn,
            prefix,
            content,
        } => {
            out.extend_from_slice(&[b'M', *flags]);
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, prefix);
            let len = u32::try_from(content.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(content);
        }
    }
    out
}

fn owned_tuple(tuple: &Tuple<'_>) -> Vec<Val> {
    tuple
        .values()
        .map(|v| match v {
            Value::Null => Val::Null,
            Value::Unchanged => Val::Unchanged,
            Value::Text(b) => Val::Text(b.to_vec()),
            Value::Binary(b) => Val::Binary(b.to_vec()),
        })
        .collect()
}

fn owned_old(old: &OldTuple<'_>) -> Old {
    match old {
        OldTuple::Key(t) => Old::Key(owned_tuple(t)),
        OldTuple::Full(t) => Old::Full(owned_tuple(t)),
    }
}

/// The model of a decoded message; flag bits the decoder does not keep come back as what
/// [`expected`] normalises them to.
fn owned(message: &Message<'_>) -> Msg {
    match message {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => Msg::Begin {
            final_lsn: final_lsn.0,
            commit_time: *commit_time,
            xid: *xid,
        },
        Message::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
        } => Msg::Commit {
            flags: 0,
            commit_lsn: commit_lsn.0,
            end_lsn: end_lsn.0,
            commit_time: *commit_time,
        },
        Message::Origin { commit_lsn, name } => Msg::Origin {
            commit_lsn: commit_lsn.0,
            name: (*name).to_owned(),
        },
        Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => Msg::Relation {
            oid: *oid,
            namespace: (*namespace).to_owned(),
            name: (*name).to_owned(),
            replica_identity: *replica_identity,
            columns: columns
                .iter()
                .map(|c| Column {
                    flags: u8::from(c.key),
                    name: c.name.to_owned(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                })
                .collect(),
        },
        Message::Type {
            oid,
            namespace,
            name,
        } => Msg::Type {
            oid: *oid,
            namespace: (*namespace).to_owned(),
            name: (*name).to_owned(),
        },
        Message::Insert { relation, new } => Msg::Insert {
            relation: *relation,
            new: owned_tuple(new),
        },
        Message::Update { relation, old, new } => Msg::Update {
            relation: *relation,
            old: old.as_ref().map(owned_old),
            new: owned_tuple(new),
        },
        Message::Delete { relation, old } => Msg::Delete {
            relation: *relation,
            old: owned_old(old),
        },
        Message::Truncate { options, relations } => Msg::Truncate {
            options: *options,
            relations: relations.clone(),
        },
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => Msg::Message {
            flags: u8::from(*transactional),
            lsn: lsn.0,
            prefix: (*prefix).to_owned(),
            content: content.to_vec(),
        },
    }
}

/// `msg` with its flag bytes reduced to what the decoder reports: Commit's flags are unused,
/// a column's only flag is bit 0 (key), a Message's only flag is bit 0 (transactional).
fn expected(mut msg: Msg) -> Msg {
    match &mut msg {
        Msg::Commit { flags, .. } => *flags = 0,
        Msg::Relation { columns, .. } => columns.iter_mut().for_each(|c| c.flags &= 1),
        Msg::Message { flags, .. } => *flags &= 1,
        _ => {}
    }
    msg
}

/// Whatever decodes, iterates: a tuple yields exactly as many values as it declares.
fn check_tuples(message: &Message<'_>) {
    let tuples: Vec<&Tuple<'_>> = match message {
        Message::Insert { new, .. } => vec![new],
        Message::Update { old, new, .. } => match old {
            Some(OldTuple::Key(t) | OldTuple::Full(t)) => vec![t, new],
            None => vec![new],
        },
        Message::Delete {
            old: OldTuple::Key(t) | OldTuple::Full(t),
            ..
        } => vec![t],
        _ => vec![],
    };
    for t in tuples {
        assert_eq!(t.values().count(), t.len());
        assert_eq!(t.is_empty(), t.values().next().is_none());
    }
}

/// A corruption of a valid message.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Overwrite(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        (any::<prop::sample::Index>(), vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::Overwrite(i, b) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
            Mutation::Overwrite(..) => {}
            Mutation::Insert(i, b) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(crate::proptest_config(2048))]

    #[test]
    fn generated_messages_decode_to_what_was_encoded(msg in message()) {
        let bytes = encode(&msg);
        let decoded = decode(&bytes);
        prop_assert!(decoded.is_ok(), "{msg:?} did not decode: {decoded:?}");
        if let Ok(decoded) = decoded {
            check_tuples(&decoded);
            prop_assert_eq!(owned(&decoded), expected(msg));
        }
    }

    #[test]
    fn a_message_cut_short_is_an_error(msg in message(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&msg);
        let short = &bytes[..cut.index(bytes.len())];
        prop_assert!(decode(short).is_err(), "{short:?} decoded");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        if let Ok(message) = decode(&bytes) {
            check_tuples(&message);
        }
    }

    #[test]
    fn corrupted_messages_never_panic(
        msg in message(),
        mutations in vec(mutation(), 1..4),
    ) {
        let bytes = mutate(encode(&msg), &mutations);
        if let Ok(message) = decode(&bytes) {
            check_tuples(&message);
        }
    }
}
