//! Globs (`*`, `?`) as SQL `LIKE` patterns, for routes and operator filters.

/// `psychometric_score.*` → `psychometric\_score.%`: `*` and `?` become `%`
/// and `_`; a literal `%`, `_` or `\` is escaped.
pub fn to_like(glob: &str) -> String {
    let mut like = String::with_capacity(glob.len());
    for c in glob.chars() {
        match c {
            '*' => like.push('%'),
            '?' => like.push('_'),
            '%' | '_' | '\\' => {
                like.push('\\');
                like.push(c);
            }
            other => like.push(other),
        }
    }
    like
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_like_patterns_with_literals_escaped() {
        assert_eq!(to_like("psychometric_score.*"), "psychometric\\_score.%");
        assert_eq!(to_like("a?c%"), "a_c\\%");
    }
}
