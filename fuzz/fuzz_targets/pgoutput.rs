//! Any bytes as one pgoutput message: a value or a typed error, never a panic; whatever
//! decodes iterates exactly as many values as its tuples declare.

#![no_main]

use ferry_postgres::pgoutput::{Message, OldTuple, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = decode(data) else {
        return;
    };
    let tuples = match &message {
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
    }
});
