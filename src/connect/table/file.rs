//! The table's files: a new file when a generation outgrows the last, renamed over the path
//! once it holds its first generation; counters carried from the old file; the live region's
//! memfd; a file left by an earlier daemon marked superseded.

use super::*;

/// The table file this daemon writes, mapped.
pub(super) struct TableFile {
    pub(super) map: Arc<Mapping>,
    pub(super) area_words: usize,
    /// Where it was created, until `install` renames it into place.
    pub(super) tmp: Option<PathBuf>,
}

impl TableFile {
    /// A new table file beside `path` (a fresh name, never following a link), mapped.
    pub(super) fn create(path: &Path, area_words: usize) -> std::io::Result<Self> {
        let words = wire_table::table_words(area_words, BACKEND_SLOTS as usize);
        let tmp = temp_name(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let result = (|| {
            file.set_len(words as u64 * 4)?;
            let map = Mapping::map(file.as_fd(), words, true)
                .map_err(std::io::Error::from_raw_os_error)?;
            let header = wire_table::header(
                u32::try_from(area_words).unwrap_or(u32::MAX),
                BACKEND_SLOTS,
                std::process::id(),
            );
            for (w, h) in map.words().iter().zip(header) {
                w.store(h, Ordering::Relaxed);
            }
            Ok(Self {
                map: Arc::new(map),
                area_words,
                tmp: Some(tmp.clone()),
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Renames the new file over `path`, once it holds its first generation.
    pub(super) fn install(&mut self, path: &Path) -> std::io::Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// The live region: a sealed memfd, mapped.
pub(super) struct LiveRegion {
    pub(super) fd: OwnedFd,
    pub(super) map: Mapping,
    pub(super) epoch: u64,
}

impl LiveRegion {
    pub(super) fn create() -> Result<Self, i32> {
        let words = live::live_words(
            SERVICE_SLOTS as usize,
            BACKEND_SLOTS as usize,
            RING as usize,
        );
        let fd = discotech_shm::sealed_memfd(c"discotech-live", words as u64 * 4)?;
        let map = Mapping::map(fd.as_fd(), words, true)?;
        let epoch = rand::random::<u64>() | 1;
        for (w, h) in
            map.words()
                .iter()
                .zip(live::header(SERVICE_SLOTS, BACKEND_SLOTS, RING, epoch))
        {
            w.store(h, Ordering::Relaxed);
        }
        Ok(Self { fd, map, epoch })
    }
}

pub(super) fn copy_stats(old: &TableFile, new: &TableFile) {
    let slots = BACKEND_SLOTS as usize;
    for slot in 0..slots as u32 {
        for word in 0..wire_table::STAT_WORDS {
            let from = wire_table::stat_index(old.area_words, slot, word);
            if let Some(v) = old.map.words().get(from) {
                let v = v.load(Ordering::Relaxed);
                if v != 0 {
                    wire_table::set_stat(
                        new.map.words(),
                        new.area_words,
                        slot,
                        word,
                        u32::from_le(v),
                    );
                }
            }
        }
    }
}

pub(super) fn temp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".new.{:016x}", rand::random::<u64>()));
    path.with_file_name(name)
}

/// Marks a table file that an earlier daemon left as superseded, so hooks that mapped it open
/// the path again and find this daemon's table. Not a table, or not ours: left alone.
pub fn supersede_left_over(path: &Path) {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return;
    };
    let words = (len / 4) as usize;
    if words < wire_table::HEADER_WORDS {
        return;
    }
    if let Ok(map) = Mapping::map(file.as_fd(), words, true)
        && Table::new(map.words()).is_ok()
    {
        wire_table::supersede(map.words());
    }
    drop::<File>(file);
}
