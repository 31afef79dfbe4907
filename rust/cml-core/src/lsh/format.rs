//! The LSH index file: magic, version, parameters, projections, vectors and
//! ids, then a CRC-32 of everything before it. Tables are not stored; they are
//! rebuilt on load. Files are written to a temporary name and renamed, so a
//! crash never leaves half a file.

use super::{LshIndex, LshParams, FILE_MAGIC, FILE_VERSION};
use crate::error::{CoreError, Result};
use std::io::{Read, Write};
use std::path::Path;

impl LshIndex {
    /// Writes the index (parameters, projections, vectors, ids; tables are
    /// rebuilt on load) with a CRC-32, to a temporary file renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map_or("index".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
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
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
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
        const HEADER: usize = 8 + 4 + 7 * 8 + 4;
        if bytes.len() < 8 || &bytes[..8] != FILE_MAGIC {
            return Err(CoreError::corrupt(
                "not a cml-rs LSH index (the file does not start with CMLRSLSH)",
            ));
        }
        if bytes.len() < HEADER + 4 {
            return Err(CoreError::corrupt(format!(
                "the index file is truncated: {} bytes, shorter than its header",
                bytes.len()
            )));
        }
        let version = get_u32(bytes, 8);
        if version != FILE_VERSION {
            return Err(CoreError::corrupt(format!(
                "the index file has format version {version}; this cml-rs reads version {FILE_VERSION} (use a matching cml-rs)"
            )));
        }
        let field = |i: usize| get_u64(bytes, 12 + 8 * i);
        let (dim, n_tables, n_hashes, seed) = (field(0), field(1), field(2), field(3));
        let (probes, default_tables, n) = (field(4), field(5), field(6));
        let width = f32::from_le_bytes(bytes[HEADER - 4..HEADER].try_into().expect("4 bytes"));
        let n_functions = n_tables.checked_mul(n_hashes);
        let expected = n_functions
            .and_then(|f| f.checked_mul(dim).and_then(|fd| fd.checked_add(f)))
            .and_then(|floats| n.checked_mul(dim).and_then(|nd| nd.checked_add(floats)))
            .and_then(|floats| floats.checked_mul(4))
            .and_then(|b| n.checked_mul(8).and_then(|ids| ids.checked_add(b)))
            .and_then(|b| b.checked_add(HEADER as u64 + 4));
        match expected {
            Some(size) if size == bytes.len() as u64 => {}
            Some(size) if size > bytes.len() as u64 => {
                return Err(CoreError::corrupt(format!(
                    "the index file is truncated: {} bytes, expected {size}",
                    bytes.len()
                )))
            }
            _ => {
                return Err(CoreError::corrupt(format!(
                "the index file's header does not match its size ({} bytes); the file is corrupted",
                bytes.len()
            )))
            }
        }
        let body = bytes.len() - 4;
        if crc32fast::hash(&bytes[..body]) != get_u32(bytes, body) {
            return Err(CoreError::corrupt(
                "the index file's checksum does not match; the file is corrupted",
            ));
        }
        let (dim, n_tables, n_hashes, n) = (
            dim as usize,
            n_tables as usize,
            n_hashes as usize,
            n as usize,
        );
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
        .map_err(|e| CoreError::corrupt(format!("the index file holds invalid parameters: {e}")))?;
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
            .set_defaults(probes as usize, default_tables as usize)
            .map_err(|e| {
                CoreError::corrupt(format!("the index file holds invalid defaults: {e}"))
            })?;
        if !index.vectors.iter().all(|v| v.is_finite()) {
            return Err(CoreError::corrupt(
                "the index file holds non-finite vectors; the file is corrupted",
            ));
        }
        index.rebuild(num_threads);
        Ok(index)
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
            idx.query(q, 5, Some(9), None, None, 1).unwrap(),
            back.query(q, 5, Some(9), None, None, 1).unwrap()
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
