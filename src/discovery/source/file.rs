//! The file source: a directory of `*.toml` zone files (or one file), reloaded live.
//! Each file is parsed on its own; a file with an error keeps serving its previous good content
//! while the error is logged, so a typo never takes a service away. Removing a file removes its
//! services: that is a deliberate change, not a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{SourceEvent, zone};
use crate::diagnostic::Diagnostic;
use crate::service::ServiceSpec;

/// How long to wait after a change event for the burst (editor save, rsync) to settle.
const SETTLE: Duration = Duration::from_millis(50);
/// A rescan even without events, in case the watcher missed something (e.g. NFS, a dir created later).
const RESCAN: Duration = Duration::from_secs(5);

/// The last good parse of each file, and what the latest scan found wrong.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    good: BTreeMap<PathBuf, (String, Vec<ServiceSpec>)>,
}

/// What one scan produced: the merged services of every file's last good content, and the problems.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    pub services: Vec<ServiceSpec>,
    pub problems: Vec<Diagnostic>,
    /// False when the path itself could not be read (missing mount, permissions): a source
    /// failure, not a statement that there are no services.
    pub readable: bool,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            good: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads every zone file. Files that fail keep their previous good content.
    pub fn scan(&mut self) -> Scan {
        let mut problems = Vec::new();
        let files = match zone_files(&self.path) {
            Ok(files) => files,
            Err(e) => {
                // An unreadable directory is a source failure: keep everything as it was.
                problems.push(Diagnostic::file(
                    &self.path,
                    format!("cannot list zone files: {e}"),
                ));
                return Scan {
                    services: self.merged(&mut problems),
                    problems,
                    readable: false,
                };
            }
        };
        self.good.retain(|p, _| files.contains(p));
        for file in &files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Diagnostic::file(
                        file,
                        format!("cannot read zone file: {e}"),
                    ));
                    continue;
                }
            };
            if self.good.get(file).is_some_and(|(old, _)| *old == text) {
                continue;
            }
            match zone::parse(file, &text) {
                Ok(services) => {
                    self.good.insert(file.clone(), (text, services));
                }
                Err(mut errs) => {
                    if self.good.contains_key(file)
                        && let Some(first) = errs.first_mut()
                    {
                        first
                            .message
                            .push_str(" (the file's previous content keeps serving)");
                    }
                    problems.append(&mut errs);
                }
            }
        }
        Scan {
            services: self.merged(&mut problems),
            problems,
            readable: true,
        }
    }

    /// Union of every file's services; a service defined in two files keeps the first file's definition.
    fn merged(&self, problems: &mut Vec<Diagnostic>) -> Vec<ServiceSpec> {
        let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
        let mut out = Vec::new();
        for (file, (_, services)) in &self.good {
            for s in services {
                if let Some(first) = seen.get(s.name.as_str()) {
                    problems.push(Diagnostic::file(
                        file,
                        format!(
                            "service {} is already defined in {}; this definition is ignored",
                            s.name,
                            first.display()
                        ),
                    ));
                    continue;
                }
                seen.insert(s.name.as_str(), file);
                out.push(s.clone());
            }
        }
        out
    }

    /// Scans, reports to the registry, and rescans on every change until `shutdown`.
    pub async fn run(
        mut self,
        index: usize,
        tx: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) {
        let (wake_tx, mut wake) = mpsc::channel::<()>(1);
        let watch_dir = if self.path.is_dir() {
            self.path.clone()
        } else {
            self.path
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let _watcher = notify::recommended_watcher(move |_event| {
            let _ = wake_tx.try_send(());
        })
        .and_then(|mut w| w.watch(&watch_dir, RecursiveMode::NonRecursive).map(|()| w))
        .map_err(|e| warn!(path = %self.path.display(), error = %e, "cannot watch zone files; rescanning every {}s", RESCAN.as_secs()))
        .ok();
        let mut last: Option<Vec<ServiceSpec>> = None;
        let mut last_problems = Vec::new();
        loop {
            let scan = self.scan();
            let news = scan.problems != last_problems;
            if news {
                for p in &scan.problems {
                    warn!(source = index, "{p}");
                }
                last_problems = scan.problems.clone();
            }
            if !scan.readable {
                // Reported once per change of problem, not on every rescan.
                let error = scan
                    .problems
                    .first()
                    .map_or_else(String::new, ToString::to_string);
                if news
                    && tx
                        .send(SourceEvent::Failed {
                            source: index,
                            error,
                        })
                        .await
                        .is_err()
                {
                    return;
                }
            } else if last.as_ref() != Some(&scan.services) {
                info!(path = %self.path.display(), services = scan.services.len(), "zone files loaded");
                last = Some(scan.services.clone());
                if tx
                    .send(SourceEvent::Reset {
                        source: index,
                        services: scan.services,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = wake.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while wake.try_recv().is_ok() {}
                    debug!(path = %self.path.display(), "zone files changed");
                }
                () = tokio::time::sleep(RESCAN) => {}
            }
        }
    }
}

/// The zone files a path names: itself if a file, else its `*.toml` entries (not hidden ones), sorted.
fn zone_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(scan: &Scan) -> Vec<&str> {
        scan.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_broken_edit_keeps_the_previous_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let web = dir.path().join("web.toml");
        fs::write(&web, "[services.web]\nbackends = [\"127.0.0.2:80\"]\n").unwrap();
        fs::write(
            dir.path().join("api.toml"),
            "[services.api]\nbackends = [\"127.0.0.3:80\"]\n",
        )
        .unwrap();
        fs::write(dir.path().join("notes.txt"), "not a zone").unwrap();
        let mut src = FileSource::new(dir.path());
        let scan = src.scan();
        assert_eq!(names(&scan), ["api", "web"]);
        assert!(scan.problems.is_empty());

        fs::write(&web, "[services.web]\nbackends = [\"127.0.0.2\"]\n").unwrap();
        let scan = src.scan();
        assert_eq!(names(&scan), ["api", "web"], "web keeps serving");
        assert_eq!(scan.services[1].backends[0].addr.port(), 80);
        assert_eq!(scan.problems.len(), 1);
        let msg = scan.problems[0].to_string();
        assert!(
            msg.contains("web.toml:2:") && msg.contains("previous content keeps serving"),
            "{msg}"
        );

        fs::remove_file(&web).unwrap();
        assert_eq!(
            names(&src.scan()),
            ["api"],
            "removing a file removes its services"
        );

        let gone = FileSource::new(dir.path().join("not-mounted")).scan();
        assert!(
            !gone.readable,
            "a missing path is a failure, not an empty set"
        );
    }

    #[test]
    fn a_service_defined_twice_keeps_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.toml"),
            "[services.web]\nbackends = [\"127.0.0.2:80\"]\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("b.toml"),
            "[services.web]\nbackends = [\"127.0.0.9:80\"]\n",
        )
        .unwrap();
        let scan = FileSource::new(dir.path()).scan();
        assert_eq!(scan.services.len(), 1);
        assert_eq!(
            scan.services[0].backends[0].addr.to_string(),
            "127.0.0.2:80"
        );
        assert!(scan.problems[0].to_string().contains("already defined in"));
    }

    #[tokio::test]
    async fn edits_are_picked_up_live() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("web.toml"),
            "[services.web]\nbackends = [\"127.0.0.2:80\"]\n",
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let task = tokio::spawn(FileSource::new(dir.path()).run(3, tx, stop.clone()));
        let first = rx.recv().await.unwrap();
        assert!(
            matches!(&first, SourceEvent::Reset { source: 3, services } if services.len() == 1)
        );
        fs::write(
            dir.path().join("api.toml"),
            "[services.api]\nbackends = [\"127.0.0.3:80\"]\n",
        )
        .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a change within 2 s")
            .unwrap();
        assert!(
            matches!(&next, SourceEvent::Reset { services, .. } if services.len() == 2),
            "{next:?}"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
