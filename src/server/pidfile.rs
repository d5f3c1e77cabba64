//! The pid file `data_dir/portcullis.pid`: the decimal pid of the process that serves, and a
//! newline. Written once the process serves (a new process rewrites it after an upgrade),
//! removed at exit only while it still names this process. `portcullis reload` and
//! `portcullis upgrade` read it to find whom to signal.

use std::path::{Path, PathBuf};

/// File name of the pid file inside `data_dir`.
pub const FILE_NAME: &str = "portcullis.pid";

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error(
        "cannot read the pid file {path}: {source} (is the gateway running with this config?)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pid file {path} does not hold a process id: {content:?}")]
    Malformed { path: PathBuf, content: String },
    #[error("cannot write the pid file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The pid in a pid file's text: decimal digits and one trailing newline (or none).
pub fn parse(content: &str) -> Option<u32> {
    let digits = content.strip_suffix('\n').unwrap_or(content);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u32>().ok().filter(|pid| *pid > 1)
}

/// The pid the file names.
pub fn read(path: &Path) -> Result<u32, PidFileError> {
    let content = std::fs::read_to_string(path).map_err(|source| PidFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&content).ok_or_else(|| PidFileError::Malformed {
        path: path.to_path_buf(),
        content: content.chars().take(40).collect(),
    })
}

/// Writes `pid` atomically (a temporary file renamed over the old one), so a reader never sees
/// half a number.
pub fn write(path: &Path, pid: u32) -> Result<(), PidFileError> {
    let err = |source| PidFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("pid.{pid}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Removes the file if it still names `pid` (after an upgrade it names the new process).
/// Returns whether it removed it.
pub fn remove_if_ours(path: &Path, pid: u32) -> bool {
    match read(path) {
        Ok(p) if p == pid => std::fs::remove_file(path).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_decimal_pid_parses() {
        assert_eq!(parse("1234\n"), Some(1234));
        assert_eq!(parse("1234"), Some(1234));
        for bad in [
            "",
            "\n",
            " 1234\n",
            "12 34\n",
            "-5\n",
            "1\n",
            "0\n",
            "99999999999\n",
            "12\n\n",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_file_is_removed_only_while_it_names_us() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        write(&p, 4242).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "4242\n");
        assert!(!remove_if_ours(&p, 4243));
        assert_eq!(read(&p).unwrap(), 4242);
        assert!(remove_if_ours(&p, 4242));
        assert!(matches!(read(&p), Err(PidFileError::Read { .. })));
    }
}
