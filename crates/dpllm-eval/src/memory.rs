//! Memory checks before allocations whose size comes from the user: a request
//! that cannot fit is a clear error up front, not an abort half-way.

/// Bytes of memory available to new allocations (Linux `MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Human-readable size (decimal units: kB, MB, GB, TB).
pub fn human(bytes: u128) -> String {
    let b = bytes as f64;
    match b {
        b if b >= 1e12 => format!("{:.2} TB", b / 1e12),
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        _ => format!("{:.1} kB", b / 1e3),
    }
}

/// Error unless `bytes` (None: beyond any size arithmetic) fit in the memory available now.
pub fn ensure_fits(bytes: Option<u128>, what: &str) -> anyhow::Result<()> {
    let Some(bytes) = bytes else {
        anyhow::bail!("{what} would need more memory than any machine has")
    };
    let limit = available_bytes().map_or(usize::MAX as u128, u128::from);
    if bytes > limit {
        anyhow::bail!(
            "{what} would need {} of memory, but only {} is available",
            human(bytes),
            human(limit)
        );
    }
    Ok(())
}

/// `a × b × c` in u128, or None on overflow.
pub fn product(factors: &[u128]) -> Option<u128> {
    factors.iter().try_fold(1u128, |acc, &f| acc.checked_mul(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_memory_are_refused() {
        assert!(ensure_fits(Some(1024), "a small buffer").is_ok());
        let e = ensure_fits(Some(1 << 100), "the weights")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the weights") && e.contains("available"), "{e}");
        assert!(ensure_fits(None, "x")
            .unwrap_err()
            .to_string()
            .contains("more memory"));
        assert_eq!(product(&[u128::MAX, 2]), None);
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(human(2_500_000_000), "2.50 GB");
    }
}
