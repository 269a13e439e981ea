use rand::SeedableRng;
use vdit_world::perturb::{add_noise, blur};
use vdit_world::*;

#[test]
fn debug_confusion() {
    let mut conf = std::collections::BTreeMap::new();
    for i in 0..600u64 {
        let split = Split::ALL[(i % 3) as usize];
        let (w, h) = [(64, 64), (96, 64), (64, 96), (112, 64)][(i / 3 % 4) as usize];
        let opts = RenderOpts { width: w, height: h, frames: 17, fps: 8.0, antialias: false };
        let (scene, text) = sample_clip(split, 21, i, opts.duration());
        let f = blur(&render(&scene, opts), w, h, 1.0);
        let f = add_noise(&f, 10.0, &mut rand_chacha::ChaCha8Rng::seed_from_u64(i));
        let p = parse_caption(&text).unwrap();
        let s = score_clip(&f, w, h, &p).unwrap();
        for o in &s.objects {
            let so = scene.objects.iter().find(|x| x.colour == o.stated.colour).unwrap();
            if let Some(t) = o.matched {
                let t = &s.tracks[t];
                *conf.entry((so.shape, so.size, t.shape, so.colour, scene.background)).or_insert(0) += 1;
            }
        }
    }
    for (k, v) in conf { if k.0 != k.2 { println!("{:?} -> {}", k, v); } }
}
