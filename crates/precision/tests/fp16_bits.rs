//! f16 and bf16 conversions are bit-exact to torch (fixtures/fp16): the named table and the sweep,
//! through our flat casts (`half` for f16) and through burn's tensor cast on the flex device.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData, bf16, f16};
use common::{f, read_bytes, read_json, st_f32, st_u16};
use kiln_precision::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

struct Case {
    name: String,
    x: f32,
    f16_bits: u16,
    f16_as_f32: f32,
    bf16_bits: u16,
    bf16_as_f32: f32,
}

fn table() -> Vec<Case> {
    let fx = read_json("fp16/fp16_table.json");
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let x = f32::from_bits(c["f32_bits"].as_u64().unwrap() as u32);
            let v = f(&c["f32"]) as f32;
            assert!(v.to_bits() == x.to_bits() || (v.is_nan() && x.is_nan()));
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                x,
                f16_bits: c["f16_bits"].as_u64().unwrap() as u16,
                f16_as_f32: f(&c["f16_as_f32"]) as f32,
                bf16_bits: c["bf16_bits"].as_u64().unwrap() as u16,
                bf16_as_f32: f(&c["bf16_as_f32"]) as f32,
            }
        })
        .collect()
}

/// NaN payloads are implementation-defined: compare NaN-ness only.
fn same_bits16(ours: u16, want: u16, is_nan: bool) -> bool {
    if is_nan { true } else { ours == want }
}

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Inputs, and torch's f16 bits, bf16 bits, f16->f32 and bf16->f32 for every table case and sweep
/// value.
fn all_cases() -> Vec<(String, f32, u16, u16, f32, f32)> {
    let mut out: Vec<_> = table()
        .into_iter()
        .map(|c| {
            (
                c.name,
                c.x,
                c.f16_bits,
                c.bf16_bits,
                c.f16_as_f32,
                c.bf16_as_f32,
            )
        })
        .collect();
    let bytes = read_bytes("fp16/fp16_sweep.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (input, _) = st_f32(&st, "input");
    let f16b = st_u16(&st, "f16");
    let bf16b = st_u16(&st, "bf16");
    let (f16f, _) = st_f32(&st, "f16_as_f32");
    let (bf16f, _) = st_f32(&st, "bf16_as_f32");
    assert!(input.len() > 1000);
    for i in 0..input.len() {
        out.push((
            format!("sweep[{i}] = {:e}", input[i]),
            input[i],
            f16b[i],
            bf16b[i],
            f16f[i],
            bf16f[i],
        ));
    }
    out
}

#[test]
fn table_covers_the_claims() {
    let t = table();
    let get = |x: f32| t.iter().find(|c| c.x == x).expect("case in table");
    assert!(get(70000.0).f16_as_f32.is_infinite());
    assert_eq!(get(1e-8).f16_as_f32, 0.0);
    assert_eq!(get(1.0001).f16_as_f32, 1.0);
    assert_eq!(get(1.0001).bf16_as_f32, 1.0);
}

#[test]
fn flat_casts_are_bit_exact_to_torch() {
    let cases = all_cases();
    let xs: Vec<f32> = cases.iter().map(|c| c.1).collect();
    let mut h = vec![f16::ZERO; xs.len()];
    let mut b = vec![bf16::ZERO; xs.len()];
    f32_to_f16(&xs, &mut h).unwrap();
    f32_to_bf16(&xs, &mut b).unwrap();
    let mut hf = vec![0f32; xs.len()];
    let mut bf = vec![0f32; xs.len()];
    f16_to_f32(&h, &mut hf).unwrap();
    bf16_to_f32(&b, &mut bf).unwrap();
    for (i, (name, x, f16_bits, bf16_bits, f16_f32, bf16_f32)) in cases.iter().enumerate() {
        let nan = x.is_nan();
        assert!(
            same_bits16(h[i].to_bits(), *f16_bits, nan),
            "{name}: f16 {:#06x} vs torch {f16_bits:#06x}",
            h[i].to_bits()
        );
        assert!(
            same_bits16(b[i].to_bits(), *bf16_bits, nan),
            "{name}: bf16 {:#06x} vs torch {bf16_bits:#06x}",
            b[i].to_bits()
        );
        assert!(
            same_f32(hf[i], *f16_f32),
            "{name}: f16 round trip {} vs {f16_f32}",
            hf[i]
        );
        assert!(
            same_f32(bf[i], *bf16_f32),
            "{name}: bf16 round trip {} vs {bf16_f32}",
            bf[i]
        );
        // half's scalar conversion agrees too.
        assert!(
            same_bits16(f16::from_f32(*x).to_bits(), *f16_bits, nan),
            "{name}: half f16"
        );
        assert!(
            same_bits16(bf16::from_f32(*x).to_bits(), *bf16_bits, nan),
            "{name}: half bf16"
        );
    }
}

#[test]
fn burn_flex_casts_are_bit_exact_to_torch() {
    let device = Device::flex();
    let cases = all_cases();
    let xs: Vec<f32> = cases.iter().map(|c| c.1).collect();
    let n = xs.len();
    let t = Tensor::<1>::from_data(TensorData::new(xs.clone(), [n]), (&device, DType::F32));
    for (dtype, is_f16) in [(DType::F16, true), (DType::BF16, false)] {
        let low = t.clone().cast(dtype);
        assert_eq!(low.dtype(), dtype);
        let data = low.clone().into_data();
        let bits: Vec<u16> = if is_f16 {
            data.as_slice::<f16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        } else {
            data.as_slice::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let back = low
            .cast(DType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (i, c) in cases.iter().enumerate() {
            let (want_bits, want_back) = if is_f16 { (c.2, c.4) } else { (c.3, c.5) };
            assert!(
                same_bits16(bits[i], want_bits, c.1.is_nan()),
                "{}: burn {dtype:?} {:#06x} vs torch {want_bits:#06x}",
                c.0,
                bits[i]
            );
            assert!(
                same_f32(back[i], want_back),
                "{}: burn {dtype:?} round trip",
                c.0
            );
        }
    }
}
