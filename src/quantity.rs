//! Kubernetes resource quantities ("1Gi", "500M", "1e9") as whole bytes.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity: use a number with an optional suffix such as 10Gi or 500M")]
    Malformed(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses a quantity and rounds any fraction of a byte up.
pub fn parse_bytes(text: &str) -> Result<i64, QuantityError> {
    let malformed = || QuantityError::Malformed(text.to_string());
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number == "+" || number == "-" {
        return Err(malformed());
    }
    let value: f64 = number.parse().map_err(|_| malformed())?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().map_err(|_| malformed())?;
            10f64.powi(power)
        }
        _ => return Err(malformed()),
    };
    let bytes = (value * multiplier).ceil();
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        return Err(QuantityError::Overflow(text.to_string()));
    }
    Ok(bytes as i64)
}

/// Formats bytes the way `kubectl` users write sizes: the largest binary
/// suffix that divides exactly.
pub fn format_bytes(bytes: i64) -> String {
    const SUFFIXES: [(&str, i64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (suffix, unit) in SUFFIXES {
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// A size flag (`100Gi`), for clap.
pub fn parse_quantity_flag(s: &str) -> Result<i64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// A duration flag (`30s`, `500ms`, `2m`), for clap.
pub fn parse_duration_flag(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let err = || format!("{s:?} is not a duration: use e.g. 30s, 500ms or 2m");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let n: u64 = s[..split].parse().map_err(|_| err())?;
    match &s[split..] {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("1e3"), Ok(1000));
        assert_eq!(parse_bytes("0.5Gi"), Ok(1 << 29));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert_eq!(parse_bytes("1500m"), Ok(2), "fractions of a byte round up");
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "Gi", "ten", "1GB", "1.2.3Gi", "--1"] {
            assert!(parse_bytes(bad).is_err(), "{bad} accepted");
        }
        assert!(matches!(
            parse_bytes("100Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for q in ["1Gi", "300Mi", "4Ki", "7"] {
            assert_eq!(format_bytes(parse_bytes(q).unwrap()), q);
        }
    }
}
