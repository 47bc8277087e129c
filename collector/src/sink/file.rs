//! JSON-lines files: appended whole and synced, so a crash leaves at most an incomplete last
//! line, which is cut at the next open (its flows were never released, so they are written
//! again).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

/// Opens a JSON-lines file for appending, first cutting an incomplete last line: a crash in
/// the middle of a write leaves one, and a line reader would take it and the next record for
/// one unparseable line. Its flows were never released (their segment is deleted only after
/// the write is synced), so they are written again whole.
pub(super) fn open_line_file(path: &std::path::Path) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let length = file.metadata()?.len();
    let whole = whole_lines_length(&mut file, length)?;
    if whole < length {
        file.set_len(whole)?;
        file.sync_all()?;
        tracing::warn!(
            "sink file {} ended in {} bytes of an incomplete line (a write cut short); removed, those flows are written again",
            path.display(),
            length - whole
        );
    }
    Ok(file)
}

/// The length of the file up to and including its last newline.
fn whole_lines_length(file: &mut File, length: u64) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut end = length;
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(at) = part.iter().rposition(|&byte| byte == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Appends `chunk` and syncs it; on any failure, cuts the file back to where it was, so the
/// retry writes the chunk once and no reader sees half of it.
pub(super) fn append_whole(file: &mut File, chunk: &[u8]) -> io::Result<()> {
    let before = file.metadata()?.len();
    let result = file.write_all(chunk).and_then(|()| file.sync_data());
    if result.is_err() {
        let _ = file.set_len(before);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incomplete_last_line_is_cut_and_whole_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        for (before, after) in [
            ("", ""),
            ("{\"a\":1}\n", "{\"a\":1}\n"),
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n"),
            ("{\"b\":", ""),
        ] {
            std::fs::write(&path, before).unwrap();
            let mut file = open_line_file(&path).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), after, "{before:?}");
            append_whole(&mut file, b"{\"c\":3}\n").unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("{after}{{\"c\":3}}\n")
            );
        }
        // A fragment longer than one read of the backwards scan.
        let long = format!("{{\"a\":1}}\n{}", "x".repeat(200_000));
        std::fs::write(&path, long).unwrap();
        drop(open_line_file(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
    }
}
