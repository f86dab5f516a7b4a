//! The `command` backend: user-given stop/start (and optional status) commands.
//!
//! Owns: splitting a command string the way a POSIX shell splits words (quotes and
//! backslashes, no expansion) and running the resulting argument list through
//! `crate::process` — never through a shell, unless the user's command itself is
//! `sh -c '...'`.
//!
//! Thread-safety: immutable after construction; `Send + Sync`.

use std::path::Path;
use std::time::Duration;

use super::{Error, ServiceControl};
use crate::process::Cmd;

/// Deadline of one stop/start command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of the status command.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Split `text` into words like a POSIX shell: blanks separate words, `'...'` is literal,
/// `"..."` keeps blanks and honours `\"`, `\\`, `\$`, `` \` ``, a backslash outside quotes
/// escapes the next character. No variables, globs or operators. Errors name the problem.
pub fn split_command(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed single quote in `{text}`")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unclosed double quote in `{text}`")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed double quote in `{text}`")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err(format!("trailing backslash in `{text}`")),
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err("the command is empty".into());
    }
    Ok(words)
}

/// Controls the service with commands the user gave (e.g. `supervisorctl stop klipper`).
#[derive(Debug, Clone)]
pub struct CommandService {
    stop: Vec<String>,
    start: Vec<String>,
    status: Option<Vec<String>>,
}

impl CommandService {
    /// Argument lists (already split); `status` exits 0 when the service runs.
    /// Panics never; empty lists are reported when run.
    pub fn new(stop: Vec<String>, start: Vec<String>, status: Option<Vec<String>>) -> Self {
        CommandService {
            stop,
            start,
            status,
        }
    }

    fn cmd(argv: &[String]) -> Result<Cmd, Error> {
        let (program, rest) = argv
            .split_first()
            .ok_or_else(|| Error::Config("empty service command".into()))?;
        Ok(Cmd::new(program).args(rest))
    }

    fn run(&self, action: &'static str, argv: &[String]) -> Result<(), Error> {
        Self::cmd(argv)?
            .timeout(COMMAND_TIMEOUT)
            .run()
            .map(drop)
            .map_err(|source| Error::Command {
                action,
                service: self.describe(),
                source: Box::new(source),
            })
    }
}

/// Whether `program` can be run: a path to an executable file, or a name found on PATH.
fn findable(program: &str) -> bool {
    fn executable(p: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

impl ServiceControl for CommandService {
    fn describe(&self) -> String {
        format!(
            "klipper (via `{}` / `{}`)",
            self.stop.join(" "),
            self.start.join(" ")
        )
    }

    fn stop(&self) -> Result<(), Error> {
        self.run("stop", &self.stop)
    }

    fn start(&self) -> Result<(), Error> {
        self.run("start", &self.start)
    }

    fn is_active(&self) -> Result<bool, Error> {
        let Some(status) = &self.status else {
            return Err(Error::Config(
                "the command backend has no status command, so whether klipper runs is unknown"
                    .into(),
            ));
        };
        let out = Self::cmd(status)?
            .timeout(STATUS_TIMEOUT)
            .run_unchecked()
            .map_err(|source| Error::Command {
                action: "query",
                service: self.describe(),
                source: Box::new(source),
            })?;
        Ok(out.status.success())
    }

    fn check(&self) -> Result<(), Error> {
        for (key, argv) in [("stop_command", &self.stop), ("start_command", &self.start)] {
            let program = argv.first().map(String::as_str).unwrap_or_default();
            if program.is_empty() || !findable(program) {
                return Err(Error::Unavailable {
                    service: self.describe(),
                    reason: format!("`{program}` from {key} is not an executable file or on PATH"),
                });
            }
        }
        if self.status.is_some() {
            self.is_active()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        split_command(text).unwrap()
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            words("supervisorctl  stop klipper"),
            ["supervisorctl", "stop", "klipper"]
        );
        assert_eq!(
            words(r#"sh -c 'echo "a b" > f'"#),
            ["sh", "-c", r#"echo "a b" > f"#]
        );
        assert_eq!(
            words(r#"echo "x \"y\" \$HOME \n""#),
            ["echo", r#"x "y" $HOME \n"#]
        );
        assert_eq!(words(r"touch a\ b ''"), ["touch", "a b", ""]);
        assert_eq!(words("a'b'\"c\"d"), ["abcd"]);
        assert_eq!(words("$HOME *"), ["$HOME", "*"]);
    }

    #[test]
    fn split_errors_are_clear() {
        assert!(split_command("echo 'x")
            .unwrap_err()
            .contains("single quote"));
        assert!(split_command("echo \"x")
            .unwrap_err()
            .contains("double quote"));
        assert!(split_command("echo x\\").unwrap_err().contains("backslash"));
        assert!(split_command("   ").unwrap_err().contains("empty"));
    }

    fn service(dir: &Path) -> CommandService {
        let marker = |name: &str| dir.join(name).display().to_string();
        CommandService::new(
            vec!["touch".into(), marker("stopped")],
            vec![
                "sh".into(),
                "-c".into(),
                format!("echo up > '{}'", marker("started")),
            ],
            Some(vec!["test".into(), "-e".into(), marker("started")]),
        )
    }

    #[test]
    fn runs_real_commands() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        svc.check().unwrap();
        assert!(!svc.is_active().unwrap());
        svc.stop().unwrap();
        assert!(dir.path().join("stopped").exists());
        svc.start().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("started")).unwrap(),
            "up\n"
        );
        assert!(svc.is_active().unwrap());
    }

    #[test]
    fn words_are_not_interpreted_by_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a b;$(echo x)");
        let text = format!("touch '{}'", odd.display());
        let svc = CommandService::new(split_command(&text).unwrap(), vec!["true".into()], None);
        svc.stop().unwrap();
        assert!(odd.exists());
    }

    #[test]
    fn failing_command_names_it_and_shows_output() {
        let svc = CommandService::new(
            vec![
                "sh".into(),
                "-c".into(),
                "echo no such process >&2; exit 7".into(),
            ],
            vec!["true".into()],
            None,
        );
        let err = svc.stop().unwrap_err().to_string();
        assert!(err.contains("cannot stop"), "{err}");
        assert!(err.contains("exit code 7"), "{err}");
        assert!(err.contains("no such process"), "{err}");
        assert!(svc.is_active().is_err());
    }

    #[test]
    fn check_finds_missing_programs() {
        let svc = CommandService::new(
            vec!["kflash-no-such-tool".into()],
            vec!["true".into()],
            None,
        );
        let err = svc.check().unwrap_err().to_string();
        assert!(err.contains("kflash-no-such-tool"), "{err}");
        assert!(err.contains("stop_command"), "{err}");
    }
}
