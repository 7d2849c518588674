//! Property test of [`from_pg_numeric`]: any numeric of up to 38 integer and 60 fractional
//! digits, sent canonically (zero groups stripped, as `numeric_send` does) or with its zero
//! groups kept (as the text path builds it), scales to what rounding its decimal digits half
//! away from zero gives.
//!
//! 2048 cases; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::prelude::*;

use super::*;

/// The binary numeric of `int`.`frac`, zero groups stripped when `canonical`.
fn numeric(negative: bool, int: &str, frac: &str, canonical: bool) -> Vec<u8> {
    let mut digits = "0".repeat((4 - int.len() % 4) % 4);
    digits.push_str(int);
    let int_groups = digits.len() / 4;
    digits.push_str(frac);
    digits.push_str(&"0".repeat((4 - frac.len() % 4) % 4));
    let mut groups: Vec<u16> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
        .collect();
    let mut weight = int_groups as i16 - 1;
    if canonical {
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
    }
    let sign = if negative { NUMERIC_NEG } else { NUMERIC_POS };
    let mut out = Vec::new();
    for word in [groups.len() as u16, weight as u16, sign, frac.len() as u16]
        .into_iter()
        .chain(groups)
    {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out
}

/// `int`.`frac` × 10^`scale`, rounded half away from zero, from its decimal digits.
fn expected(negative: bool, int: &str, frac: &str, scale: usize) -> I256 {
    let mut value = I256 {
        limbs: [0; 4],
        negative,
    };
    let kept = frac.get(..scale).unwrap_or(frac);
    for d in int.bytes().chain(kept.bytes()) {
        value.mul_add(10, u64::from(d - b'0')).unwrap();
    }
    for _ in kept.len()..scale {
        value.mul_add(10, 0).unwrap();
    }
    if frac.as_bytes().get(scale).is_some_and(|d| *d >= b'5') {
        value.mul_add(1, 1).unwrap();
    }
    value
}

proptest! {
    #![proptest_config(crate::proptest_config(2048))]

    #[test]
    fn numerics_scale_as_their_decimal_digits_round(
        negative in any::<bool>(),
        int in "|[1-9][0-9]{0,37}|9{38}",
        frac in "[0-9]{0,60}|9{0,60}",
        scale in 0usize..=38,
        canonical in any::<bool>(),
    ) {
        let bytes = numeric(negative, &int, &frac, canonical);
        let want = expected(negative, &int, &frac, scale);
        let got = from_pg_numeric(&bytes, scale as u32);
        prop_assert_eq!(got, Ok(Numeric::Value(want)), "{}.{} at scale {}", int, frac, scale);
        prop_assert!(want.has_at_most_digits(77));
    }
}
