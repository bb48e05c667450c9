//! Walks a GGUF header before candle parses it. candle bounds most length
//! fields, but not all of them (a `general.alignment` of 0 makes it divide
//! by zero, and a tensor's element count can overflow), and it keeps every
//! metadata value in memory at ~32 bytes each. A corrupt or crafted file must
//! fail here with an error that names the problem, never panic or exhaust
//! memory.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Result};
use candle_core::quantized::gguf_file;

/// Deepest nesting of metadata arrays candle accepts.
const MAX_VALUE_DEPTH: usize = 64;
/// Metadata values kept in memory. Real files hold about four per vocabulary
/// entry (tokens, scores, types, merges): 1M covers a 256k vocabulary.
const MAX_METADATA_VALUES: u64 = 1 << 24;
/// GGML tensors have at most four dimensions.
const MAX_TENSOR_DIMS: u32 = 4;

/// Reads a GGUF header (metadata and tensor directory) from `reader`, after
/// checking that every length and count in it fits the file.
pub fn read_gguf_content<R: Read + Seek>(reader: &mut R) -> Result<gguf_file::Content> {
    let start = reader.stream_position()?;
    let end = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(start))?;
    check_gguf_header(&mut Walker {
        reader: &mut *reader,
        pos: start,
        end,
        values: 0,
    })?;
    reader.seek(SeekFrom::Start(start))?;
    // Last resort: the walk above should leave candle nothing to panic on.
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(reader)
    }));
    match parsed {
        Ok(content) => Ok(content?),
        Err(_) => bail!("the GGUF header is corrupt (its parser failed)"),
    }
}

struct Walker<'a, R> {
    reader: &'a mut R,
    pos: u64,
    end: u64,
    values: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2OrLater,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    fn need(&self, bytes: u64, what: &str) -> Result<()> {
        if bytes > self.remaining() {
            bail!(
                "the GGUF header is truncated or corrupt: {what} needs {bytes} bytes at byte {}, \
                 but the file ends at byte {}",
                self.pos,
                self.end
            );
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn length(&mut self, version: Version, what: &str) -> Result<u64> {
        match version {
            Version::V1 => Ok(u64::from(self.u32(what)?)),
            Version::V2OrLater => self.u64(what),
        }
    }

    fn skip(&mut self, bytes: u64, what: &str) -> Result<()> {
        self.need(bytes, what)?;
        self.pos += bytes;
        self.reader.seek(SeekFrom::Start(self.pos))?;
        Ok(())
    }

    /// Reads a string's length and skips its bytes; returns them when short
    /// enough to be a key worth looking at.
    fn string(&mut self, version: Version, what: &str) -> Result<Option<String>> {
        let len = self.length(version, what)?;
        self.need(len, what)?;
        if len <= 64 {
            let mut buf = vec![0u8; len as usize];
            self.reader.read_exact(&mut buf)?;
            self.pos += len;
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        self.skip(len, what)?;
        Ok(None)
    }

    fn count_value(&mut self, n: u64, key: &str) -> Result<()> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_METADATA_VALUES {
            bail!(
                "the GGUF metadata holds more than {MAX_METADATA_VALUES} values (at `{key}`); \
                 the file is corrupt"
            );
        }
        Ok(())
    }

    /// Skips one metadata value; returns it when it is a plain integer.
    fn value(&mut self, ty: u32, version: Version, key: &str, depth: usize) -> Result<Option<u64>> {
        if depth > MAX_VALUE_DEPTH {
            bail!("the GGUF metadata `{key}` nests arrays deeper than {MAX_VALUE_DEPTH} levels");
        }
        let what = format!("metadata `{key}`");
        Ok(match ty {
            0 | 1 | 7 => Some(u64::from(self.bytes::<1>(&what)?[0])),
            2 | 3 => Some(u64::from(u16::from_le_bytes(self.bytes(&what)?))),
            4 | 5 => Some(u64::from(self.u32(&what)?)),
            6 => self.skip(4, &what).map(|_| None)?,
            10 | 11 => Some(self.u64(&what)?),
            12 => self.skip(8, &what).map(|_| None)?,
            8 => self.string(version, &what).map(|_| None)?,
            9 => {
                let elem = self.u32(&what)?;
                let len = self.length(version, &what)?;
                self.count_value(len, key)?;
                match fixed_size(elem) {
                    Some(size) => self.skip(len.saturating_mul(size), &what)?,
                    None => {
                        // Strings and arrays take at least their length prefix each.
                        self.need(len.saturating_mul(4), &what)?;
                        for _ in 0..len {
                            self.value(elem, version, key, depth + 1)?;
                        }
                    }
                }
                None
            }
            other => bail!("the GGUF metadata `{key}` has unknown value type {other}"),
        })
    }
}

/// On-disk size of a fixed-size metadata value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn check_gguf_header<R: Read + Seek>(w: &mut Walker<'_, R>) -> Result<()> {
    let magic = w.u32("the magic number")?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        bail!("not a GGUF file: it does not start with the bytes `GGUF`");
    }
    let version = match w.u32("the version")? {
        1 => Version::V1,
        2 | 3 => Version::V2OrLater,
        v => bail!("GGUF version {v} is not supported (1 to 3 are)"),
    };
    let tensor_count = w.length(version, "the tensor count")?;
    let kv_count = w.length(version, "the metadata count")?;
    // A metadata entry takes at least 9 bytes and a tensor entry at least 20.
    w.need(
        kv_count
            .saturating_mul(9)
            .saturating_add(tensor_count.saturating_mul(20)),
        &format!("{kv_count} metadata entries and {tensor_count} tensors"),
    )?;
    let mut alignment = None;
    for _ in 0..kv_count {
        let key = w
            .string(version, "a metadata key")?
            .unwrap_or_else(|| "(long key)".into());
        let ty = w.u32(&format!("the type of metadata `{key}`"))?;
        w.count_value(1, &key)?;
        let value = w.value(ty, version, &key, 0)?;
        if key == "general.alignment" && ty <= 5 {
            alignment = value;
        }
    }
    if alignment == Some(0) {
        bail!("the GGUF header is corrupt: `general.alignment` is 0");
    }
    for i in 0..tensor_count {
        let name = w
            .string(version, &format!("the name of tensor {i}"))?
            .unwrap_or_else(|| format!("number {i}"));
        let what = format!("tensor `{name}`");
        let n_dims = w.u32(&what)?;
        if n_dims > MAX_TENSOR_DIMS {
            bail!("GGUF tensor `{name}` has {n_dims} dimensions; at most {MAX_TENSOR_DIMS} are allowed");
        }
        let mut elems: Option<u64> = Some(1);
        for _ in 0..n_dims {
            let d = w.length(version, &what)?;
            elems = elems.and_then(|e| e.checked_mul(d));
        }
        // candle reads an empty tensor through a misaligned pointer (a
        // panic in debug builds, undefined behaviour otherwise).
        if elems == Some(0) {
            bail!("GGUF tensor `{name}` has a 0 in its shape (no elements); the file is corrupt");
        }
        // Every tensor lies in the file and no GGML type packs more than
        // eight elements per byte, so a bigger shape is corrupt.
        if elems.is_none_or(|e| e / 8 > w.end) {
            bail!(
                "GGUF tensor `{name}` has a shape larger than the whole file; the file is corrupt"
            );
        }
        w.skip(12, &what)?; // dtype (u32) and data offset (u64)
    }
    Ok(())
}

/// A shard named by `model.safetensors.index.json` must be a file in the
/// model's folder: an absolute path or `..` would read files elsewhere.
pub fn check_shard_name(name: &str) -> Result<()> {
    let path = std::path::Path::new(name);
    let mut parts = path.components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(_)), None) => Ok(()),
        _ => bail!(
            "model.safetensors.index.json names the shard `{name}`, which is not a file in the \
             model's folder; the index is corrupt"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn shards_outside_the_model_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = |shard: &str| {
            let json = serde_json::json!({"weight_map": {"lm_head.weight": shard}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                json.to_string(),
            )
            .unwrap();
            super::super::weights::safetensors_files(dir.path())
        };
        let shard = "model-00001-of-00002.safetensors";
        assert_eq!(index(shard).unwrap(), vec![dir.path().join(shard)]);
        // These used to be joined to the folder: an absolute path replaced it.
        for name in [
            "/etc/passwd",
            "../other/model.safetensors",
            "sub/../../x",
            "",
        ] {
            let err = index(name).unwrap_err().to_string();
            assert!(
                err.contains("not a file in the model's folder"),
                "{name}: {err}"
            );
        }
    }

    fn header(kvs: &[(&str, u32, &[u8])], tensors: &[(&str, &[u64])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (key, ty, value) in kvs {
            b.extend_from_slice(&(key.len() as u64).to_le_bytes());
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(value);
        }
        for (name, dims) in tensors {
            b.extend_from_slice(&(name.len() as u64).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&0u32.to_le_bytes()); // f32
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        b
    }

    fn read(bytes: Vec<u8>) -> Result<gguf_file::Content> {
        read_gguf_content(&mut Cursor::new(bytes))
    }

    #[test]
    fn a_valid_header_reads() {
        let mut bytes = header(
            &[("general.alignment", 4, &32u32.to_le_bytes())],
            &[("t", &[4])],
        );
        let data_start = bytes.len().next_multiple_of(32);
        bytes.resize(data_start + 16, 0);
        let content = read(bytes).unwrap();
        assert_eq!(content.tensor_infos["t"].shape.dims(), &[4]);
    }

    #[test]
    fn zero_alignment_is_refused() {
        // candle divides the data offset by the alignment: this panicked.
        let bytes = header(&[("general.alignment", 4, &0u32.to_le_bytes())], &[]);
        let err = read(bytes).unwrap_err().to_string();
        assert!(err.contains("`general.alignment` is 0"), "{err}");
    }

    #[test]
    fn a_shape_whose_element_count_overflows_is_refused() {
        let bytes = header(&[], &[("t", &[1 << 32, 1 << 32, 1 << 32])]);
        let err = read(bytes).unwrap_err().to_string();
        assert!(err.contains("tensor `t` has a shape larger"), "{err}");
    }

    #[test]
    fn an_empty_tensor_is_refused() {
        let mut bytes = header(&[], &[("t", &[4, 0])]);
        bytes.resize(bytes.len().next_multiple_of(32) + 16, 0);
        let err = read(bytes).unwrap_err().to_string();
        assert!(err.contains("tensor `t` has a 0 in its shape"), "{err}");
    }

    #[test]
    fn a_string_longer_than_the_file_is_refused() {
        let mut bytes = header(&[], &[]);
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes()); // one metadata entry
        bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // its key's length
        bytes.extend_from_slice(&[0; 16]);
        let err = read(bytes).unwrap_err().to_string();
        assert!(err.contains("truncated or corrupt"), "{err}");
    }
}
