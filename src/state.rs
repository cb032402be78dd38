//! Durable state files in the state directory, written atomically: a reader (or a crash) sees the
//! old file or the new one, never a torn mix. Write a temp file beside the target, fsync it,
//! rename it over the target, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically.
///
/// # Errors
/// Any I/O error creating, writing, syncing or renaming; the target is untouched on error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Replaces `path` atomically with what `write` writes, through a buffer: a large state is
/// encoded straight into the file, never whole in memory.
///
/// # Errors
/// As [`write_atomic`], and whatever `write` returns; the target is untouched on error.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let result = (|| {
        // A fresh random name, created or nothing: a link or file planted at a guessable name
        // beside the target is never followed or truncated.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let mut out = io::BufWriter::with_capacity(1 << 16, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp.{:016x}", rand::random::<u64>()));
    path.with_file_name(name)
}

/// Checks that a directory the daemon keeps state or sockets in cannot be written by anyone but
/// its owner, and that the owner is root or the daemon's own user: otherwise another user could
/// replace what the daemon writes there, or what hooked programs read.
///
/// # Errors
/// `PermissionDenied` naming the directory and what is wrong with it.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    let euid = discotech_shm::euid();
    let why = if meta.uid() != 0 && meta.uid() != euid {
        Some(format!(
            "it belongs to uid {}, not to root or the daemon's uid {euid}",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "its mode {:04o} lets other users write it",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: refusing a directory others can write: {why}",
                dir.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Moves a file that could not be parsed aside (`NAME.corrupt`) so the next start does not trip
/// on it again, and returns where it went.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".corrupt");
    let aside = path.with_file_name(name);
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("magic.json");
        write_atomic(&path, b"first version, longer").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("magic.json")]);
    }

    #[test]
    fn set_aside_renames_to_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backends.json");
        fs::write(&path, b"{not json").unwrap();
        let aside = set_aside(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(aside.file_name().unwrap(), "backends.json.corrupt");
    }

    #[test]
    fn a_link_planted_at_the_old_temp_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let path = dir.path().join("magic.json");
        // The name the daemon used to write first, predictable from its pid.
        let planted = dir
            .path()
            .join(format!("magic.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_atomic(&path, b"state").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(fs::read(&path).unwrap(), b"state");
    }

    #[test]
    fn directories_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        check_private_dir(dir.path()).unwrap();
        for mode in [0o775, 0o757, 0o1777] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let e = check_private_dir(dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("lets other users write it"), "{e}");
        }
    }
}
