//! A tiny glob matcher for device patterns and `[include]` file names.
//!
//! `*` matches any run of characters (including none), `?` exactly one character; every
//! other character matches itself. No character classes, no `**`. Pure and thread-safe.

/// Whether `pattern` has any wildcard.
pub fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `name` matches `pattern` as a whole.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` and the name position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == n[ni])) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_a_shell() {
        assert!(glob_match(
            "usb-Klipper_stm32*",
            "usb-Klipper_stm32f446xx_1234-if00"
        ));
        assert!(!glob_match(
            "usb-Klipper_stm32*",
            "usb-Klipper_rp2040_E661-if00"
        ));
        assert!(glob_match("*rp2040*", "usb-Klipper_rp2040_E661-if00"));
        assert!(glob_match("ttyACM?", "ttyACM0"));
        assert!(!glob_match("ttyACM?", "ttyACM10"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*.cfg", "macros.cfg"));
        assert!(has_wildcard("a*") && has_wildcard("a?") && !has_wildcard("abc"));
    }
}
