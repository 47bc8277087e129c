//! The one line a binary prints when a command fails: each cause once. Libraries wrap errors
//! in context, and some (aya among them) put their source's text in their own message as well,
//! so printing every link of the chain would say the same cause two or three times.

use std::error::Error;

/// `error` and its causes, outermost first, joined by `: `, leaving out a cause whose text
/// the line already holds.
pub fn error_line<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Link(String, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl Error for Link {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|link| link as &(dyn Error + 'static))
        }
    }

    fn chain<'a>(error: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
        std::iter::successors(Some(error), |&error| error.source()).collect()
    }

    #[test]
    fn each_cause_is_said_once() {
        let os = Link("No such file or directory (os error 2)".into(), None);
        let read = Link(
            "reading /x.toml: No such file or directory (os error 2)".into(),
            Some(Box::new(os)),
        );
        let top = Link("the settings".into(), Some(Box::new(read)));
        assert_eq!(
            error_line(chain(&top)),
            "the settings: reading /x.toml: No such file or directory (os error 2)"
        );
        let inner = Link("permission denied".into(), None);
        let outer = Link("pinning".into(), Some(Box::new(inner)));
        assert_eq!(error_line(chain(&outer)), "pinning: permission denied");
    }
}
