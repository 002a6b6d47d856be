//! Path patterns: absolute paths whose segments may hold `*`, `?` and `[...]`,
//! matched one segment at a time as a shell does, and their expansion over the
//! files the module can see. Knows nothing of kinds, ids or configuration.

/// An absolute path pattern such as `/dev/ttyUSB*` or `/dev/bus/usb/*/*`.
///
/// Per segment: `*` matches any run of characters, `?` any one character,
/// `[abc]`, `[a-z]` one character of the set (`[!...]` or `[^...]`: not of the
/// set; a `]` first in the set or a `-` first or last stands for itself). A
/// leading `.` in a name is matched only by a literal `.`, so `*` skips hidden
/// names. No wildcard crosses a `/`; `**` is a `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// A name without wildcards: joined on, never listed.
    Literal(String),
    /// A name with wildcards: matched against the directory's entries.
    Glob(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`
    AnyChar,
    /// `*`
    AnyRun,
    /// `[...]`: inclusive character ranges (`a` is `a-a`).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    /// Whether this single-character token matches `c` (never for `AnyRun`).
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Char(want) => *want == c,
            Token::AnyChar => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

impl Pattern {
    /// Parses `text`.
    ///
    /// # Errors
    /// Why `text` is not a pattern: not absolute, not normalised (`//`, a
    /// trailing `/`, `.` or `..` segments), a NUL, a `[` without its `]`, or a
    /// range that runs backwards.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| format!("`{text}` is not an absolute path"))?;
        if rest.is_empty() {
            return Err(format!("`{text}` names no file"));
        }
        if text.contains('\0') {
            return Err(format!("`{text}` holds a NUL"));
        }
        let segments = rest
            .split('/')
            .map(|s| parse_segment(s).map_err(|why| format!("`{text}`: {why}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { segments })
    }

    /// Whether `path` (absolute, normalised) matches, by its names alone.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let names: Vec<&str> = rest.split('/').collect();
        names.len() == self.segments.len()
            && self
                .segments
                .iter()
                .zip(names)
                .all(|(segment, name)| match segment {
                    Segment::Literal(literal) => literal == name,
                    Segment::Glob(tokens) => glob_matches(tokens, name),
                })
    }

    /// The paths that match, as found under the host directory `root` (`""` for
    /// `/`): each is the path without `root`, so `root` + path is the file on the
    /// host. Only what exists and is not a directory, following symlinks (a
    /// dangling one, or one leading out of what the module may read, is not
    /// found). Sorted by name within each directory. Directories the module
    /// cannot read are skipped: they hold nothing it can see.
    pub fn expand(&self, root: &str) -> Vec<String> {
        let mut found = vec![String::new()];
        for segment in &self.segments {
            let mut next = Vec::new();
            for dir in &found {
                match segment {
                    Segment::Literal(name) => next.push(format!("{dir}/{name}")),
                    Segment::Glob(tokens) => {
                        let listing = if root.is_empty() && dir.is_empty() {
                            "/".to_string()
                        } else {
                            format!("{root}{dir}")
                        };
                        let Ok(entries) = std::fs::read_dir(&listing) else {
                            continue;
                        };
                        let mut names: Vec<String> = entries
                            .flatten()
                            .filter_map(|entry| entry.file_name().into_string().ok())
                            .filter(|name| glob_matches(tokens, name))
                            .collect();
                        names.sort();
                        next.extend(names.into_iter().map(|name| format!("{dir}/{name}")));
                    }
                }
            }
            found = next;
        }
        found.retain(|path| is_node(root, path));
        found
    }
}

/// Whether `root` + `path` exists and is not a directory (symlinks followed).
pub fn is_node(root: &str, path: &str) -> bool {
    std::fs::metadata(format!("{root}{path}")).is_ok_and(|m| !m.is_dir())
}

fn parse_segment(segment: &str) -> Result<Segment, String> {
    match segment {
        "" => return Err("not normalised (`//` or a trailing `/`)".into()),
        "." | ".." => return Err("not normalised (`.` or `..`)".into()),
        _ => {}
    }
    if !segment.contains(['*', '?', '[']) {
        return Ok(Segment::Literal(segment.to_string()));
    }
    let mut tokens = Vec::new();
    let mut chars = segment.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // `**` is `*`: consecutive runs match what one does.
            '*' if tokens.last() == Some(&Token::AnyRun) => {}
            '*' => tokens.push(Token::AnyRun),
            '?' => tokens.push(Token::AnyChar),
            '[' => tokens.push(parse_class(&mut chars)?),
            c => tokens.push(Token::Char(c)),
        }
    }
    Ok(Segment::Glob(tokens))
}

/// The rest of a `[...]` set, after its `[`.
fn parse_class(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Token, String> {
    let negated = chars.next_if(|c| matches!(c, '!' | '^')).is_some();
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = chars.next().ok_or("`[` without its closing `]`")?;
        if c == ']' && !first {
            return Ok(Token::Class { negated, ranges });
        }
        first = false;
        // `a-z` is a range; a `-` before the closing `]` stands for itself.
        let mut ahead = chars.clone();
        if ahead.next() == Some('-')
            && let Some(end) = ahead.next().filter(|end| *end != ']')
        {
            if end < c {
                return Err(format!("the range `{c}-{end}` runs backwards"));
            }
            chars.next();
            chars.next();
            ranges.push((c, end));
            continue;
        }
        ranges.push((c, c));
    }
}

/// Whether `name` matches a segment's tokens: wildcard matching that backtracks
/// only to the last `*`, which is enough when every other token is one character.
fn glob_matches(tokens: &[Token], name: &str) -> bool {
    let name: Vec<char> = name.chars().collect();
    if name.first() == Some(&'.') && tokens.first() != Some(&Token::Char('.')) {
        return false;
    }
    let (mut t, mut n) = (0, 0);
    // The last `*` seen and where in `name` its run currently ends.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match tokens.get(t) {
            Some(Token::AnyRun) => {
                star = Some((t, n));
                t += 1;
            }
            Some(token) if token.matches(name[n]) => {
                t += 1;
                n += 1;
            }
            _ => match star {
                Some((at, end)) => {
                    star = Some((at, end + 1));
                    t = at + 1;
                    n = end + 1;
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|token| *token == Token::AnyRun)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).expect("valid").matches(path)
    }

    #[test]
    fn wildcards_match_within_one_segment() {
        assert!(matches("/dev/ttyUSB*", "/dev/ttyUSB0"));
        assert!(matches("/dev/ttyUSB*", "/dev/ttyUSB"));
        assert!(matches("/dev/ttyUSB*", "/dev/ttyUSB12"));
        assert!(!matches("/dev/ttyUSB*", "/dev/ttyACM0"));
        assert!(!matches("/dev/*", "/dev/snd/pcm"), "no `*` crosses a `/`");
        assert!(matches("/dev/*/*", "/dev/snd/pcm"));
        assert!(matches("/dev/tty?", "/dev/tty1"));
        assert!(!matches("/dev/tty?", "/dev/tty12"));
        assert!(matches("/dev/*a*b*", "/dev/xaxxbx"));
        assert!(matches("/dev/*a*b", "/dev/abab"));
        assert!(!matches("/dev/*a*b", "/dev/abba"));
        assert!(matches("/dev/**", "/dev/x"));
        assert!(matches("/dev/video0", "/dev/video0"));
        assert!(!matches("/dev/video0", "/dev/video01"));
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(matches("/dev/ttyS[0-3]", "/dev/ttyS3"));
        assert!(!matches("/dev/ttyS[0-3]", "/dev/ttyS4"));
        assert!(matches("/dev/sd[ab]", "/dev/sdb"));
        assert!(!matches("/dev/sd[!ab]", "/dev/sdb"));
        assert!(matches("/dev/sd[^ab]", "/dev/sdc"));
        assert!(
            matches("/dev/x[]]", "/dev/x]"),
            "`]` first stands for itself"
        );
        assert!(
            matches("/dev/x[a-]", "/dev/x-"),
            "`-` last stands for itself"
        );
        assert!(
            matches("/dev/x[*]", "/dev/x*"),
            "a wildcard in a set is literal"
        );
        assert!(!matches("/dev/x[*]", "/dev/xy"));
    }

    #[test]
    fn hidden_names_need_a_literal_dot() {
        assert!(!matches("/dev/*", "/dev/.udev"));
        assert!(!matches("/dev/?udev", "/dev/.udev"));
        assert!(matches("/dev/.*", "/dev/.udev"));
        assert!(matches("/dev/*.*", "/dev/a.b"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (text, why) in [
            ("dev/tty*", "not an absolute path"),
            ("/", "names no file"),
            ("/dev//tty*", "not normalised"),
            ("/dev/tty*/", "not normalised"),
            ("/dev/../etc/*", "not normalised"),
            ("/dev/./tty*", "not normalised"),
            ("/dev/tty[0-9", "without its closing `]`"),
            ("/dev/tty[9-0]", "runs backwards"),
        ] {
            let err = Pattern::parse(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains(text), "{text}: names the pattern: {err}");
        }
    }

    #[test]
    fn expand_finds_nodes_in_name_order_and_skips_directories() {
        let root = tempfile_root();
        let dev = format!("{root}/dev");
        std::fs::create_dir_all(format!("{dev}/snd/by-path")).expect("dirs");
        for node in [
            "ttyUSB1",
            "ttyUSB0",
            "ttyACM0",
            "snd/pcmC0D0p",
            "snd/controlC0",
        ] {
            std::fs::write(format!("{dev}/{node}"), "").expect("node");
        }
        let expand = |p: &str| Pattern::parse(p).expect("valid").expand(&root);
        assert_eq!(expand("/dev/ttyUSB*"), ["/dev/ttyUSB0", "/dev/ttyUSB1"]);
        assert_eq!(
            expand("/dev/snd/*"),
            ["/dev/snd/controlC0", "/dev/snd/pcmC0D0p"]
        );
        assert_eq!(expand("/dev/*/pcm*"), ["/dev/snd/pcmC0D0p"]);
        assert_eq!(expand("/dev/ttyACM0"), ["/dev/ttyACM0"]);
        assert!(expand("/dev/ttyACM1").is_empty());
        assert!(expand("/dev/video*").is_empty());
        assert!(expand("/nowhere/*").is_empty());
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    /// A fresh directory for the one test that needs files (the guest crate
    /// has no `tempfile`).
    fn tempfile_root() -> String {
        let dir = std::env::temp_dir().join(format!("wdp-generic-pattern-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.display().to_string()
    }
}
