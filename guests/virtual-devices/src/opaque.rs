//! The opaque configuration a DRA claim request carries for this driver: each
//! entry of `claim-request.config` is the JSON text of one `opaque.parameters`,
//! parsed here into an [`OpaqueConfig`]. Plain Rust, no host calls, so it is
//! tested natively; `prepare` and `unprepare` decide what the values mean.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

/// The keys an entry may have.
const KEYS: &[&str] = &["env", "failUnprepare"];

/// One entry of a request's configuration: a JSON object whose keys are all
/// optional, and no others are allowed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpaqueConfig {
    /// `env`: environment variables to set, in the order written.
    pub env: Vec<(String, String)>,
    /// `failUnprepare`, if the entry sets it: whether `unprepare` of the claim
    /// fails.
    pub fail_unprepare: Option<bool>,
}

impl OpaqueConfig {
    /// Parses one entry.
    ///
    /// # Errors
    /// serde_json's description of the problem: invalid JSON, not an object,
    /// an unknown or repeated key, `env` not an object of strings or
    /// `failUnprepare` not a boolean.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

impl<'de> Deserialize<'de> for OpaqueConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand rather than derived: a derived struct would also accept a
        // JSON array (its fields by position), and `env` keeps the order the
        // author wrote, which serde_json's own map type sorts away.
        struct ConfigVisitor;

        impl<'de> Visitor<'de> for ConfigVisitor {
            type Value = OpaqueConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object with the optional keys `env` and `failUnprepare`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OpaqueConfig, A::Error> {
                let mut env: Option<EnvVars> = None;
                let mut fail_unprepare: Option<bool> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "env" if env.is_some() => return Err(de::Error::duplicate_field("env")),
                        "env" => env = Some(map.next_value()?),
                        "failUnprepare" if fail_unprepare.is_some() => {
                            return Err(de::Error::duplicate_field("failUnprepare"));
                        }
                        "failUnprepare" => fail_unprepare = Some(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, KEYS)),
                    }
                }
                Ok(OpaqueConfig {
                    env: env.map(|e| e.0).unwrap_or_default(),
                    fail_unprepare,
                })
            }
        }

        deserializer.deserialize_map(ConfigVisitor)
    }
}

/// The value of `env`: an object of strings, in the order written.
struct EnvVars(Vec<(String, String)>);

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvVisitor;

        impl<'de> Visitor<'de> for EnvVisitor {
            type Value = EnvVars;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of environment variable names to string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvVars, A::Error> {
                let mut vars = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    vars.push((key, value));
                }
                Ok(EnvVars(vars))
            }
        }

        deserializer.deserialize_map(EnvVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_object_is_the_default() {
        assert_eq!(OpaqueConfig::parse("{}"), Ok(OpaqueConfig::default()));
    }

    #[test]
    fn env_keeps_the_order_written() {
        let config = OpaqueConfig::parse(r#"{"env": {"B": "2", "A": "1"}}"#).unwrap();
        assert_eq!(config.env, env(&[("B", "2"), ("A", "1")]));
        assert_eq!(config.fail_unprepare, None);
    }

    #[test]
    fn fail_unprepare_is_read() {
        let config = OpaqueConfig::parse(r#"{"failUnprepare": true, "env": {}}"#).unwrap();
        assert_eq!(config.fail_unprepare, Some(true));
        assert!(config.env.is_empty());
        let config = OpaqueConfig::parse(r#"{"failUnprepare": false}"#).unwrap();
        assert_eq!(config.fail_unprepare, Some(false));
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = OpaqueConfig::parse(r#"{"envs": {}}"#).unwrap_err();
        assert!(err.contains("unknown field `envs`"), "{err}");
    }

    #[test]
    fn non_object_is_refused() {
        for text in [r#"[]"#, r#""env""#, "1", "null", "true"] {
            assert!(OpaqueConfig::parse(text).is_err(), "{text} accepted");
        }
    }

    #[test]
    fn non_string_env_value_is_refused() {
        let err = OpaqueConfig::parse(r#"{"env": {"A": 1}}"#).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        assert!(OpaqueConfig::parse(r#"{"env": ["A"]}"#).is_err());
    }

    #[test]
    fn non_bool_fail_unprepare_is_refused() {
        assert!(OpaqueConfig::parse(r#"{"failUnprepare": "yes"}"#).is_err());
    }

    #[test]
    fn repeated_key_is_refused() {
        assert!(OpaqueConfig::parse(r#"{"env": {}, "env": {}}"#).is_err());
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(OpaqueConfig::parse(r#"{"env": "#).is_err());
        assert!(OpaqueConfig::parse("").is_err());
    }
}
