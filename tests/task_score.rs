//! The task score's image analysis (src/quality/task.rs) on images whose answer is known:
//! training-style renders (all must pass, also blurred), the same images against wrong
//! prompts (must fail) and uniform noise (must score near chance).

use sdsparse::quality::task::{analyze, judge, render_scene, Scene, TaskSpec};

/// The grammar and palette `tools/train_toy.py` writes to task.json.
const SPEC: &str = r#"{
 "grammar": "a {shape_colour} {shape} on a {background_colour} background",
 "colours": {"red": [255, 0, 0], "green": [0, 255, 0], "blue": [0, 0, 255], "yellow": [255, 255, 0],
             "white": [255, 255, 255], "black": [0, 0, 0]},
 "shapes": ["circle", "square", "triangle"],
 "image_size": 64
}"#;

/// A small seeded generator (splitmix64) so the test needs no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A random training-style scene: size 20..44 px, 2 px margin (as the training script).
fn random_scene(spec: &TaskSpec, rng: &mut Rng) -> (Scene, Vec<u8>) {
    let scenes = spec.all_scenes();
    let scene = scenes[rng.below(scenes.len())];
    let size = rng.uniform(20.0, 44.0);
    let (lo, hi) = (size / 2.0 + 2.0, 64.0 - size / 2.0 - 2.0);
    let (cx, cy) = (rng.uniform(lo, hi), rng.uniform(lo, hi));
    (scene, render_scene(spec, &scene, 64, size, cx, cy))
}

fn box_blur(rgb: &[u8], side: usize) -> Vec<u8> {
    let mut out = rgb.to_vec();
    for y in 1..side - 1 {
        for x in 1..side - 1 {
            for c in 0..3 {
                let mut s = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        s += rgb[3 * ((y + dy - 1) * side + x + dx - 1) + c] as u32;
                    }
                }
                out[3 * (y * side + x) + c] = (s / 9) as u8;
            }
        }
    }
    out
}

#[test]
fn every_training_scene_passes() {
    let spec = TaskSpec::from_json_str(SPEC).unwrap();
    let mut rng = Rng(1);
    let n = 600;
    let (mut sharp, mut blurred) = (0, 0);
    for _ in 0..n {
        let (scene, rgb) = random_scene(&spec, &mut rng);
        let v = judge(&spec, &scene, 64, 64, &rgb).unwrap();
        if v.pass() {
            sharp += 1;
        } else {
            let r = analyze(&spec, 64, 64, &rgb).unwrap();
            eprintln!("failed: {} read as {r:?}", spec.caption(&scene));
        }
        blurred += judge(&spec, &scene, 64, 64, &box_blur(&rgb, 64)).unwrap().pass() as usize;
    }
    assert_eq!(sharp, n, "training images must all pass");
    assert!(blurred as f64 >= 0.98 * n as f64, "blurred training images: {blurred}/{n}");
}

#[test]
fn every_scene_of_the_grammar_round_trips_and_wrong_prompts_fail() {
    let spec = TaskSpec::from_json_str(SPEC).unwrap();
    let scenes = spec.all_scenes();
    assert_eq!(scenes.len(), 6 * 5 * 3);
    for (i, s) in scenes.iter().enumerate() {
        assert_eq!(spec.parse(&spec.caption(s)), Some(*s));
        let rgb = render_scene(&spec, s, 64, 30.0, 30.0 + (i % 5) as f64, 33.0);
        assert!(judge(&spec, s, 64, 64, &rgb).unwrap().pass(), "{}", spec.caption(s));
        // Every other scene's prompt must fail on this image.
        for t in scenes.iter().filter(|t| *t != s) {
            assert!(
                !judge(&spec, t, 64, 64, &rgb).unwrap().pass(),
                "{} passed as {}",
                spec.caption(s),
                spec.caption(t)
            );
        }
    }
    assert_eq!(spec.parse("a purple circle on a red background"), None);
    assert_eq!(
        spec.parse("  A Red Circle on a blue background "),
        Some(Scene { shape_colour: 0, shape: 0, background: 2 })
    );
}

#[test]
fn noise_scores_near_chance() {
    let spec = TaskSpec::from_json_str(SPEC).unwrap();
    let scenes = spec.all_scenes();
    let mut rng = Rng(7);
    let n = 400;
    let (mut pass, mut colour, mut bg) = (0, 0, 0);
    for i in 0..n {
        let rgb: Vec<u8> = (0..3 * 64 * 64).map(|_| rng.next() as u8).collect();
        let v = judge(&spec, &scenes[i % scenes.len()], 64, 64, &rgb).unwrap();
        pass += v.pass() as usize;
        colour += v.shape_colour as usize;
        bg += v.background as usize;
    }
    // Chance: 1/90 for all three, 1/6 for the background, 1/5 for the shape colour.
    assert!(pass as f64 <= 0.05 * n as f64, "noise passed {pass}/{n}");
    assert!(
        (bg as f64) < 0.4 * n as f64 && (colour as f64) < 0.4 * n as f64,
        "bg {bg} colour {colour} of {n}"
    );
}

#[test]
fn a_plain_image_has_no_shape_and_bad_buffers_are_errors() {
    let spec = TaskSpec::from_json_str(SPEC).unwrap();
    let rgb = [0u8, 0, 255].repeat(64 * 64);
    let r = analyze(&spec, 64, 64, &rgb).unwrap();
    assert_eq!((r.background, r.shape_colour, r.shape), (2, None, None));
    assert!(analyze(&spec, 64, 64, &rgb[..100]).is_err());
    assert!(TaskSpec::from_json_str("{}").is_err());
    assert!(TaskSpec::from_json_str(&SPEC.replace("{shape}", "{form}")).is_err());
}
