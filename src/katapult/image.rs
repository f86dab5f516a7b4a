//! Firmware inspection: which MCU and version a `klipper.bin` was built for.
//!
//! Klipper embeds its data dictionary (the JSON of `klipper.dict`) zlib-compressed in the
//! image. We scan for zlib headers (`0x78` followed by `0x01`, `0x5e`, `0x9c` or `0xda`),
//! inflate each candidate (bounded, so a hostile image cannot exhaust memory) and take the
//! first that parses as JSON with `config.MCU` and `version`.
//!
//! Pure functions; thread-safe.

use std::io::Read;
use std::path::Path;

use flate2::read::ZlibDecoder;

use super::Error;

/// Largest inflated dictionary we accept (real ones are tens of KiB).
const MAX_DICT: u64 = 8 << 20;

/// What the embedded data dictionary says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `config.MCU` of the dictionary (e.g. "stm32f103xe").
    pub mcu: String,
    /// `version`: what klippy will report as `mcu_version` once this image runs.
    pub version: String,
    /// Byte offset of the zlib stream in the image.
    pub offset: usize,
}

fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf == 0x78 && matches!(flg, 0x01 | 0x5e | 0x9c | 0xda)
}

fn parse_dict(bytes: &[u8]) -> Option<(String, String)> {
    let mut out = Vec::new();
    ZlibDecoder::new(bytes)
        .take(MAX_DICT)
        .read_to_end(&mut out)
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&out).ok()?;
    let mcu = json.get("config")?.get("MCU")?.as_str()?.to_owned();
    let version = json.get("version")?.as_str()?.to_owned();
    Some((mcu, version))
}

/// Read a raw firmware image (klipper.bin), refusing what Katapult must never be given:
/// an empty file, or an ELF, UF2 or Intel HEX file (their bytes are not the flash image).
pub fn read_image(path: &Path) -> Result<Vec<u8>, Error> {
    let image = std::fs::read(path).map_err(|source| Error::Firmware {
        path: path.to_owned(),
        source,
    })?;
    if image.is_empty() {
        return Err(Error::EmptyFirmware {
            path: path.to_owned(),
        });
    }
    let kind = if image.starts_with(b"\x7fELF") {
        Some("ELF")
    } else if image.starts_with(b"UF2\n") {
        Some("UF2")
    } else if image.starts_with(b":")
        && image
            .iter()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'\r' | b'\n'))
    {
        Some("Intel HEX")
    } else {
        None
    };
    match kind {
        Some(kind) => Err(Error::NotRawImage {
            path: path.to_owned(),
            kind,
        }),
        None => Ok(image),
    }
}

/// The MCU and version of the data dictionary embedded in a firmware image.
///
/// `Error::NoDictionary` when no zlib stream in the image inflates to a dictionary.
pub fn image_info(bytes: &[u8]) -> Result<ImageInfo, Error> {
    bytes
        .windows(2)
        .enumerate()
        .find_map(|(offset, w)| {
            if !is_zlib_header(w[0], w[1]) {
                return None;
            }
            let (mcu, version) = parse_dict(&bytes[offset..])?;
            Some(ImageInfo {
                mcu,
                version,
                offset,
            })
        })
        .ok_or(Error::NoDictionary)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::ZlibEncoder;
    use flate2::Compression;
    use std::io::Write;

    /// A fake klipper.bin: code bytes, then the zlib dictionary, then more code.
    pub(crate) fn fake_image(mcu: &str, version: &str, level: u32, code_len: usize) -> Vec<u8> {
        let dict = serde_json::json!({
            "app": "Klipper",
            "version": version,
            "config": {"MCU": mcu, "CLOCK_FREQ": 72_000_000},
            "commands": {"get_uptime": 1},
        });
        let mut enc = ZlibEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(dict.to_string().as_bytes()).unwrap();
        let z = enc.finish().unwrap();
        // Code that contains decoy zlib headers which do not inflate to a dictionary.
        let mut image: Vec<u8> = (0..code_len).map(|i| (i * 7 + 3) as u8).collect();
        image.extend_from_slice(&[0x78, 0x9c, 0x00, 0x01, 0x78, 0xda, 0xff]);
        image.extend(z);
        image.extend((0..code_len).map(|i| (i * 13) as u8));
        image
    }

    #[test]
    fn finds_the_dictionary_at_every_compression_level() {
        for level in [0, 1, 6, 9] {
            let img = fake_image("stm32f103xe", "v0.13.0-730-g84104bbbd", level, 1000);
            let info = image_info(&img).expect("dictionary");
            assert_eq!(info.mcu, "stm32f103xe");
            assert_eq!(info.version, "v0.13.0-730-g84104bbbd");
            assert_eq!(info.offset, 1007);
        }
    }

    #[test]
    fn only_raw_images_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], Option<&str>); 5] = [
            ("klipper.elf", b"\x7fELF\x02\x01\x01", Some("ELF")),
            ("klipper.uf2", b"UF2\nWQ]\x9e", Some("UF2")),
            (
                "klipper.elf.hex",
                b":10000000F8FF0020\r\n:00000001FF\r\n",
                Some("Intel HEX"),
            ),
            ("empty.bin", b"", None),
            ("klipper.bin", b":\x00 starts like hex but is binary", None),
        ];
        for (name, bytes, refused_as) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            match (read_image(&path), refused_as) {
                (Err(Error::NotRawImage { kind, .. }), Some(want)) => assert_eq!(kind, want),
                (Err(Error::EmptyFirmware { .. }), None) => assert!(bytes.is_empty()),
                (Ok(image), None) => assert_eq!(image, bytes),
                (other, _) => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn images_without_a_dictionary_have_no_info() {
        assert!(matches!(image_info(&[]), Err(Error::NoDictionary)));
        assert!(matches!(
            image_info(&[0x78, 0x9c, 1, 2, 3]),
            Err(Error::NoDictionary)
        ));
        let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
        enc.write_all(br#"{"version": "v1", "config": {}}"#)
            .unwrap();
        assert!(matches!(
            image_info(&enc.finish().unwrap()),
            Err(Error::NoDictionary)
        ));
    }
}
