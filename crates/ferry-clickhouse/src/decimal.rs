//! Postgres `numeric` (binary, base-10000 digits) → ClickHouse Decimal as a scaled integer of
//! up to 256 bits, exact, rounding half away from zero when the source has more fractional
//! digits than the column's scale (as Postgres's own casts do).

/// A signed 256-bit integer: magnitude in little-endian 64-bit limbs, and a sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct I256 {
    limbs: [u64; 4],
    negative: bool,
}

impl I256 {
    pub(crate) const ZERO: Self = Self {
        limbs: [0; 4],
        negative: false,
    };

    fn mul_add(&mut self, factor: u64, add: u64) -> Result<(), String> {
        let mut carry = u128::from(add);
        for limb in &mut self.limbs {
            let product = u128::from(*limb) * u128::from(factor) + carry;
            *limb = product as u64;
            carry = product >> 64;
        }
        if carry != 0 {
            return Err("numeric value too large for Decimal(76)".into());
        }
        Ok(())
    }

    /// ±(10^`digits` − 1): the largest magnitude of a Decimal of `digits` digits (≤ 76).
    pub(crate) fn all_nines(digits: u32, negative: bool) -> Self {
        let mut value = Self {
            limbs: [0; 4],
            negative,
        };
        for _ in 0..digits {
            // 10^76 - 1 < 2^255: never overflows for a Decimal's precision.
            if value.mul_add(10, 9).is_err() {
                break;
            }
        }
        value
    }

    pub(crate) fn is_negative(&self) -> bool {
        self.negative && !self.is_zero()
    }

    fn is_zero(&self) -> bool {
        self.limbs == [0; 4]
    }

    /// Whether the magnitude is below 10^`digits` (the value has at most that many digits).
    pub(crate) fn has_at_most_digits(&self, digits: u32) -> bool {
        let mut limit = Self::ZERO;
        limit.limbs[0] = 1;
        for _ in 0..digits {
            if limit.mul_add(10, 0).is_err() {
                return true; // 10^digits exceeds 256 bits: every value fits.
            }
        }
        let (a, b) = (self.limbs, limit.limbs);
        (0..4)
            .rev()
            .find(|&i| a[i] != b[i])
            .is_some_and(|i| a[i] < b[i])
    }

    /// Whether the value fits a two's-complement integer of `width` bytes.
    pub(crate) fn fits_in_bytes(&self, width: usize) -> bool {
        let bits = width * 8 - 1;
        // Magnitude must be < 2^bits (ignoring the one extra negative value, never needed here).
        self.limbs.iter().enumerate().all(|(i, limb)| {
            let low = i * 64;
            if low >= bits {
                *limb == 0
            } else if low + 64 > bits {
                limb >> (bits - low) == 0
            } else {
                true
            }
        })
    }

    /// Two's complement, little endian, 32 bytes.
    pub(crate) fn to_le_bytes(self) -> [u8; 32] {
        let mut limbs = self.limbs;
        if self.negative && !self.is_zero() {
            let mut carry = 1u64;
            for limb in &mut limbs {
                let (sum, overflow) = (!*limb).overflowing_add(carry);
                *limb = sum;
                carry = u64::from(overflow);
            }
        }
        let mut out = [0u8; 32];
        for (i, limb) in limbs.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        out
    }
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;

/// A decoded numeric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Numeric {
    /// The value scaled to the requested scale.
    Value(I256),
    /// Too large for 256 bits at that scale (certainly too large for any Decimal).
    TooLarge {
        negative: bool,
    },
    /// ±Infinity.
    Infinity {
        negative: bool,
    },
    NaN,
}

/// Decodes a binary numeric scaled to `scale` fractional digits.
pub(crate) fn from_pg_numeric(bytes: &[u8], scale: u32) -> Result<Numeric, String> {
    let word = |i: usize| -> Result<u16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated numeric ({} bytes)", bytes.len()))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    if bytes.len() != 8 + 2 * ndigits {
        return Err(format!(
            "numeric with {ndigits} digits has {} bytes",
            bytes.len()
        ));
    }
    let negative = match sign {
        NUMERIC_POS => false,
        NUMERIC_NEG => true,
        0xC000 => return Ok(Numeric::NaN),
        0xD000 => return Ok(Numeric::Infinity { negative: false }),
        0xF000 => return Ok(Numeric::Infinity { negative: true }),
        other => return Err(format!("bad numeric sign {other:#x}")),
    };
    let mut value = I256 {
        limbs: [0; 4],
        negative,
    };
    // Digits are taken down to the scale's last; the digit after it alone decides rounding
    // (half away from zero), and digits below it cannot change the result. The group that
    // holds the scale's last digit is taken digit by digit: whole, it can carry three digits
    // more, and 76 digits and three more overflow 256 bits.
    let lowest = -i64::from(scale);
    let mut last = None; // the exponent of the last digit taken
    let mut rounding = 0;
    for i in 0..ndigits {
        let digit = word(4 + i)?;
        if digit >= 10_000 {
            return Err(format!("bad numeric digit {digit}"));
        }
        let top = 4 * (weight - i as i64) + 3;
        if top < lowest - 1 {
            continue;
        }
        if top - 3 >= lowest {
            // The whole group is kept: one step instead of four.
            if value.mul_add(10_000, u64::from(digit)).is_err() {
                return Ok(Numeric::TooLarge { negative });
            }
            last = Some(top - 3);
            continue;
        }
        for (exponent, divisor) in (top - 3..=top).rev().zip([1000, 100, 10, 1]) {
            let decimal = u64::from(digit / divisor % 10);
            if exponent >= lowest {
                if value.mul_add(10, decimal).is_err() {
                    return Ok(Numeric::TooLarge { negative });
                }
                last = Some(exponent);
            } else if exponent == lowest - 1 {
                rounding = decimal;
            }
        }
    }
    // value = digits × 10^last; we want it × 10^scale.
    if let Some(last) = last
        && !value.is_zero()
    {
        for _ in 0..last - lowest {
            if value.mul_add(10, 0).is_err() {
                return Ok(Numeric::TooLarge { negative });
            }
        }
    }
    if rounding >= 5 && value.mul_add(1, 1).is_err() {
        return Ok(Numeric::TooLarge { negative });
    }
    Ok(Numeric::Value(value))
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Postgres's numeric_send for a decimal string (test helper).
    fn pg(text: &str) -> Vec<u8> {
        let negative = text.starts_with('-');
        let text = text.trim_start_matches('-');
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let dscale = frac.len();
        let pad_int = (4 - int.len() % 4) % 4;
        let pad_frac = (4 - frac.len() % 4) % 4;
        let digits_text = format!("{}{int}{frac}{}", "0".repeat(pad_int), "0".repeat(pad_frac));
        let digits: Vec<u16> = digits_text
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let weight = (int.len() + pad_int) as i16 / 4 - 1;
        let mut out = Vec::new();
        out.extend_from_slice(&(digits.len() as u16).to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&(if negative { NUMERIC_NEG } else { NUMERIC_POS }).to_be_bytes());
        out.extend_from_slice(&(dscale as u16).to_be_bytes());
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    fn value(bytes: &[u8], scale: u32) -> I256 {
        match from_pg_numeric(bytes, scale).unwrap() {
            Numeric::Value(v) => v,
            other => panic!("{other:?}"),
        }
    }

    fn scaled(text: &str, scale: u32) -> i128 {
        let Numeric::Value(v) = from_pg_numeric(&pg(text), scale).unwrap() else {
            panic!("{text} is not a value");
        };
        i128::from_le_bytes(v.to_le_bytes()[..16].try_into().unwrap())
    }

    #[test]
    fn values() {
        assert_eq!(scaled("0", 2), 0);
        assert_eq!(scaled("12.34", 2), 1234);
        assert_eq!(scaled("-12.34", 4), -123_400);
        assert_eq!(scaled("10000", 0), 10_000);
        assert_eq!(scaled("0.0001", 4), 1);
        assert_eq!(scaled("123456789.123456789", 9), 123_456_789_123_456_789);
        assert_eq!(scaled("1.005", 2), 101); // half away from zero
        assert_eq!(scaled("-1.005", 2), -101);
        assert_eq!(scaled("1.004", 2), 100);
    }

    #[test]
    fn special_values_and_garbage() {
        for (sign, expected) in [
            (0xC000u16, Numeric::NaN),
            (0xD000, Numeric::Infinity { negative: false }),
            (0xF000, Numeric::Infinity { negative: true }),
        ] {
            let mut b = vec![0, 0, 0, 0];
            b.extend_from_slice(&sign.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            assert_eq!(from_pg_numeric(&b, 2).unwrap(), expected);
        }
        assert!(from_pg_numeric(&[0, 1, 0, 0, 0, 0, 0, 0], 0).is_err());
        assert!(from_pg_numeric(&[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10], 0).is_err());
        assert!(from_pg_numeric(&[], 0).is_err());
        // 80 nines: too large for 256 bits, which is not malformed.
        assert_eq!(
            from_pg_numeric(&pg(&format!("-{}", "9".repeat(80))), 0).unwrap(),
            Numeric::TooLarge { negative: true }
        );
        let nines = I256::all_nines(76, false);
        assert!(nines.has_at_most_digits(76) && !nines.has_at_most_digits(75));
        assert!(nines.fits_in_bytes(32));
    }

    #[test]
    fn long_fractions_round_without_overflow() {
        // 100 fractional digits: rounds to 38, where accumulating all would overflow 256 bits.
        let text = format!("1.{}", "3".repeat(99) + "7");
        let Numeric::Value(v) = from_pg_numeric(&pg(&text), 38).unwrap() else {
            panic!("not a value");
        };
        let digits = format!("1{}", "3".repeat(38));
        let expected: i128 = digits.parse().unwrap();
        assert_eq!(
            i128::from_le_bytes(v.to_le_bytes()[..16].try_into().unwrap()),
            expected
        );
        assert!(v.has_at_most_digits(39) && !v.has_at_most_digits(38));
    }

    /// Found by the property test: 38 integer and 37 fractional digits fit Decimal(76, 38),
    /// but the last base-10000 group carries three digits more, and accumulating whole groups
    /// overflowed 256 bits ("too many integer digits").
    #[test]
    fn a_full_decimal_76_38_is_a_value() {
        let (int, frac) = ("9".repeat(38), "9".repeat(37));
        let full = value(&pg(&format!("{int}.{frac}")), 38);
        assert_eq!(full, value(&pg(&format!("{int}{frac}0")), 0));
        assert!(full.has_at_most_digits(76));
        // Rounding at the scale still looks at the first digit dropped.
        let text = format!("{int}.{}5", "9".repeat(37));
        assert_eq!(
            value(&pg(&text), 37),
            value(&pg(&format!("1{}", "0".repeat(75))), 0)
        );
        assert_eq!(scaled("0.5", 0), 1);
        assert_eq!(scaled("-0.49", 0), 0);
        assert_eq!(scaled("0.00005", 4), 1);
    }

    #[test]
    fn widths() {
        let v = value(&pg("99999.9999"), 4);
        assert!(v.fits_in_bytes(4));
        let v = value(&pg("999999.9999"), 4);
        assert!(!v.fits_in_bytes(4) && v.fits_in_bytes(8));
        let max38 = "9".repeat(38);
        let v = value(&pg(&max38), 0);
        assert!(v.fits_in_bytes(16));
        let v = value(&pg(&"9".repeat(76)), 0);
        assert!(!v.fits_in_bytes(16) && v.fits_in_bytes(32));
    }
}
