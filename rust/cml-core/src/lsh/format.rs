//! The LSH index file: magic, version, parameters, projections, vectors and
//! ids, then a CRC-32 of everything before it. Tables are not stored; they are
//! rebuilt on load. Files are written to a temporary name and renamed, so a
//! crash never leaves half a file; the temporaries a killed save left behind
//! are removed by the next save of the same file.
//!
//! Reading trusts nothing: only regular files are opened (a FIFO or
//! /dev/zero would block or never end), the header's sizes are checked
//! against the file's length before anything is read or allocated, and after
//! the checksum the content must make sense (finite numbers, a positive
//! width, unique non-negative ids, defaults within the shape).

use super::{LshIndex, LshParams, FILE_MAGIC, FILE_VERSION};
use crate::error::{CoreError, Result};
use crate::vectors::Vectors;
use std::io::{Read, Write};
use std::path::Path;

/// Bytes before the arrays: magic, version, seven u64 fields, the width.
const HEADER: usize = 8 + 4 + 7 * 8 + 4;

impl LshIndex {
    /// Writes the index (parameters, projections, vectors, ids; tables are
    /// rebuilt on load) with a CRC-32, to a temporary file renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let name = path
            .file_name()
            .map_or("index".into(), |n| n.to_string_lossy());
        remove_stale_temporaries(path, &name);
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|e| CoreError::io(path, e))
    }

    pub fn load(path: &Path, num_threads: usize) -> Result<LshIndex> {
        let metadata = std::fs::metadata(path).map_err(|e| CoreError::io(path, e))?;
        if !metadata.is_file() {
            let kind = if metadata.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(CoreError::invalid(format!(
                "{} is {kind}; an LSH index is a file written by LshIndex.save",
                path.display()
            )));
        }
        let mut file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
        let mut header = vec![0u8; HEADER.min(metadata.len() as usize)];
        file.read_exact(&mut header)
            .map_err(|e| CoreError::io(path, e))?;
        let expected = check_header(&header, metadata.len())?;
        let mut bytes = crate::alloc::reserve(expected as usize, "the index file")?;
        bytes.extend_from_slice(&header);
        file.take(expected - HEADER as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| CoreError::io(path, e))?;
        LshIndex::from_bytes(&bytes, num_threads)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.memory_bytes());
        out.extend_from_slice(FILE_MAGIC);
        put_u32(&mut out, FILE_VERSION);
        let p = &self.params;
        for v in [
            p.dim as u64,
            p.n_tables as u64,
            p.n_hashes as u64,
            p.seed,
            self.default_probes as u64,
            self.default_tables as u64,
            self.len() as u64,
        ] {
            put_u64(&mut out, v);
        }
        let width = p.bucket_width.unwrap_or(0.0);
        out.extend_from_slice(&width.to_le_bytes());
        for &v in self
            .projections
            .iter()
            .chain(&self.offsets)
            .chain(&self.vectors)
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &id in &self.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        let checksum = crc32fast::hash(&out);
        put_u32(&mut out, checksum);
        out
    }

    pub fn from_bytes(bytes: &[u8], num_threads: usize) -> Result<LshIndex> {
        let expected = check_header(bytes, bytes.len() as u64)?;
        if expected != bytes.len() as u64 {
            return Err(CoreError::corrupt(format!(
                "the index file's header does not match its size ({} bytes); the file is corrupted",
                bytes.len()
            )));
        }
        let body = bytes.len() - 4;
        if crc32fast::hash(&bytes[..body]) != get_u32(bytes, body) {
            return Err(CoreError::corrupt(
                "the index file's checksum does not match; the file is corrupted",
            ));
        }
        let field = |i: usize| get_u64(bytes, 12 + 8 * i) as usize;
        let (dim, n_tables, n_hashes, seed) = (field(0), field(1), field(2), field(3) as u64);
        let (probes, default_tables, n) = (field(4), field(5), field(6));
        let width = f32::from_le_bytes(bytes[HEADER - 4..HEADER].try_into().expect("4 bytes"));
        // 0 stands for "not chosen yet" (an index saved before any vector was added).
        if !(width == 0.0 || (width.is_finite() && width > 0.0)) {
            return Err(corrupt(format!("its bucket width is {width}")));
        }
        let params = LshParams {
            dim,
            n_tables,
            n_hashes,
            bucket_width: (width > 0.0).then_some(width),
            seed,
        };
        let mut index = LshIndex::new(LshParams {
            bucket_width: None,
            ..params.clone()
        })
        .map_err(|e| corrupt(format!("its parameters are invalid ({e})")))?;
        index.params = params;
        let mut floats = bytes[HEADER..body]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
        let n_functions = n_tables * n_hashes;
        index.projections = floats.by_ref().take(n_functions * dim).collect();
        index.offsets = floats.by_ref().take(n_functions).collect();
        index.vectors = floats.take(n * dim).collect();
        let id_start = HEADER + 4 * (n_functions * (dim + 1) + n * dim);
        index.ids = bytes[id_start..body]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        index
            .set_defaults(probes, default_tables)
            .map_err(|e| corrupt(format!("its default search is invalid ({e})")))?;
        let hashes_ok = index.projections.iter().all(|v| v.is_finite())
            && index
                .offsets
                .iter()
                .all(|v| v.is_finite() && (0.0..1.0).contains(v));
        if !hashes_ok {
            return Err(corrupt(
                "its hash functions hold non-finite or out-of-range numbers",
            ));
        }
        Vectors::new("vectors", &index.vectors, dim)
            .and_then(|v| v.check_values("vectors"))
            .map_err(|e| corrupt(format!("its vectors are invalid ({e})")))?;
        let mut sorted = index.ids.clone();
        sorted.sort_unstable();
        if sorted.first().is_some_and(|&id| id < 0) || sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(corrupt("its ids are negative or repeated"));
        }
        index.rebuild(num_threads);
        Ok(index)
    }
}

/// The error of a file whose checksum holds but whose content cannot be.
fn corrupt(what: impl std::fmt::Display) -> CoreError {
    CoreError::corrupt(format!("the index file is corrupted: {what}"))
}

/// The total size the header of an index file declares, checked against the
/// bytes there are (`available`): magic, version, and sizes that add up
/// without overflow and within the shape an index may have.
fn check_header(bytes: &[u8], available: u64) -> Result<u64> {
    if bytes.len() < 8 || &bytes[..8] != FILE_MAGIC {
        return Err(CoreError::corrupt(
            "not a cml-rs LSH index (the file does not start with CMLRSLSH)",
        ));
    }
    if bytes.len() < HEADER || available < HEADER as u64 + 4 {
        return Err(CoreError::corrupt(format!(
            "the index file is truncated: {available} bytes, shorter than its header"
        )));
    }
    let version = get_u32(bytes, 8);
    if version != FILE_VERSION {
        return Err(CoreError::corrupt(format!(
            "the index file has format version {version}; this cml-rs reads version {FILE_VERSION} (use a matching cml-rs)"
        )));
    }
    let field = |i: usize| get_u64(bytes, 12 + 8 * i);
    let (dim, n_tables, n_hashes, n) = (field(0), field(1), field(2), field(6));
    if dim == 0
        || dim > super::MAX_DIM as u64
        || n_tables == 0
        || n_tables > super::MAX_TABLES as u64
        || n_hashes == 0
        || n_hashes > super::MAX_HASHES as u64
        || n > u32::MAX as u64
    {
        return Err(corrupt(format!(
            "its header declares dim {dim}, {n_tables} tables of {n_hashes} hashes and {n} vectors"
        )));
    }
    let n_functions = n_tables * n_hashes;
    let floats = n_functions * (dim + 1)
        + n.checked_mul(dim)
            .ok_or_else(|| corrupt("its sizes overflow"))?;
    let size = floats
        .checked_mul(4)
        .and_then(|b| b.checked_add(n.checked_mul(8)?))
        .and_then(|b| b.checked_add(HEADER as u64 + 4))
        .ok_or_else(|| corrupt("its sizes overflow"))?;
    if size > available {
        return Err(CoreError::corrupt(format!(
            "the index file is truncated: {available} bytes, expected {size}"
        )));
    }
    Ok(size)
}

/// Removes the temporaries of earlier saves of `path` whose writer is gone
/// (a save killed between writing and renaming), so they do not pile up.
/// A temporary of a live process, another save in progress, is left alone.
pub(crate) fn remove_stale_temporaries(path: &Path, name: &str) {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id exists (signal 0; elsewhere than Linux,
/// assume it does, so nothing is removed).
fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let status = unsafe { libc::kill(pid as libc::pid_t, 0) };
        status == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use crate::csr::Filter;
    use crate::lsh::tests::{clustered, index};
    use crate::lsh::LshIndex;
    use crate::vectors::Vectors;

    #[test]
    fn round_trips_through_bytes_and_rejects_damage() {
        let dim = 4;
        let data = clustered(500, dim, 5, 6);
        let idx = index(&data, dim, 3);
        let bytes = idx.to_bytes();
        let back = LshIndex::from_bytes(&bytes, 1).unwrap();
        let q = Vectors::new("v", &data[..40], dim).unwrap();
        assert_eq!(
            idx.query(q, 5, Some(9), None, Filter::default(), 1)
                .unwrap(),
            back.query(q, 5, Some(9), None, Filter::default(), 1)
                .unwrap()
        );
        assert!(LshIndex::from_bytes(&bytes[..bytes.len() - 10], 1)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut flipped = bytes.clone();
        flipped[200] ^= 1;
        assert!(LshIndex::from_bytes(&flipped, 1)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut version = bytes.clone();
        version[8] = 9;
        assert!(LshIndex::from_bytes(&version, 1)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        assert!(LshIndex::from_bytes(b"garbage", 1)
            .unwrap_err()
            .to_string()
            .contains("not a cml-rs LSH index"));
    }
}
