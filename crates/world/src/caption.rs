//! Captions (SPEC.md, "Captions"): the sampler and the parser.
//!
//! ```text
//! object  := (a | an) [size] colour shape [motion]
//! motion  := standing still | not moving | resting                       (still)
//!          | (moving | sliding | going) [slowly | quickly] (left | right | up | down)
//! caption := object [and object] [on a background background]
//!          | on a background background , object [and object]
//! ```
//! Sampling probabilities: size omitted 0.3, motion phrase omitted 0.1, speed omitted 0.3 (of a
//! moving object's phrase), background phrase omitted 0.2; the still phrase and the verb are
//! uniform over their three forms. Where the spec is silent: when the background is stated it
//! comes first with probability 0.5 (the second template).
//!
//! The parser is lenient in form only: it ignores case, accepts `a` or `an` before any word and a
//! comma attached to `background`. Any other word outside the grammar is an error naming it.

use crate::scene::{Background, Colour, Motion, Scene, Shape, Size, Speed};
use crate::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Probability that a caption omits an object's size.
pub const P_OMIT_SIZE: f64 = 0.3;
/// Probability that a caption omits an object's whole motion phrase.
pub const P_OMIT_MOTION: f64 = 0.1;
/// Probability that a moving object's phrase omits its speed.
pub const P_OMIT_SPEED: f64 = 0.3;
/// Probability that a caption omits the background phrase.
pub const P_OMIT_BACKGROUND: f64 = 0.2;
/// Probability that a caption stating the background puts it first.
pub const P_BACKGROUND_FIRST: f64 = 0.5;

const STILL_PHRASES: [&str; 3] = ["standing still", "not moving", "resting"];
const VERBS: [&str; 3] = ["moving", "sliding", "going"];

/// The attributes one caption object states; `None` means the caption leaves it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedObject {
    pub colour: Colour,
    pub shape: Shape,
    pub size: Option<Size>,
    /// `None` when the motion phrase is omitted.
    pub motion: Option<Motion>,
    /// Stated only in a directional phrase with `slowly`/`quickly`. A still object has no speed;
    /// an omitted motion phrase leaves the speed open too.
    pub speed: Option<Speed>,
}

/// The attribute kinds a caption can state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    Colour,
    Shape,
    Size,
    Motion,
    Speed,
    Background,
    Count,
}

impl ParsedObject {
    /// Attributes of this object the caption leaves open (drawn at random in the scene). Speed
    /// is open for a moving or unstated motion without a speed word; it does not apply to a
    /// stated still object.
    pub fn open(&self) -> Vec<Attribute> {
        let mut v = Vec::new();
        if self.size.is_none() {
            v.push(Attribute::Size);
        }
        if self.motion.is_none() {
            v.push(Attribute::Motion);
        }
        if self.speed.is_none() && self.motion != Some(Motion::Still) {
            v.push(Attribute::Speed);
        }
        v
    }
}

/// What a caption states: its objects in order and, if stated, the background. The object count
/// is always stated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedCaption {
    pub objects: Vec<ParsedObject>,
    pub background: Option<Background>,
}

impl ParsedCaption {
    /// Whether `scene` satisfies every attribute the caption states, object by object in order.
    pub fn consistent_with(&self, scene: &Scene) -> bool {
        self.objects.len() == scene.objects.len()
            && self.background.is_none_or(|b| b == scene.background)
            && self.objects.iter().zip(&scene.objects).all(|(p, o)| {
                p.colour == o.colour
                    && p.shape == o.shape
                    && p.size.is_none_or(|s| s == o.size)
                    && p.motion.is_none_or(|m| m == o.motion)
                    && p.speed.is_none_or(|s| Some(s) == o.speed)
            })
    }

    /// Whether every object is stated to be still (the clips on which flicker is measured).
    pub fn all_still(&self) -> bool {
        !self.objects.is_empty() && self.objects.iter().all(|o| o.motion == Some(Motion::Still))
    }
}

/// The article of an object phrase whose next word is `next`: `an` before the one attribute
/// word that starts with a vowel (`orange`), else `a`.
pub fn article(next: &str) -> &'static str {
    if next == "orange" {
        "an"
    } else {
        "a"
    }
}

/// Samples a caption of `scene` under the spec's grammar and omission probabilities.
pub fn caption<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let mut objs = Vec::with_capacity(scene.objects.len());
    for o in &scene.objects {
        let mut words: Vec<&str> = Vec::new();
        if !rng.random_bool(P_OMIT_SIZE) {
            words.push(o.size.name());
        }
        words.push(o.colour.name());
        words.push(o.shape.name());
        if !rng.random_bool(P_OMIT_MOTION) {
            match (o.motion, o.speed) {
                (Motion::Still, _) | (_, None) => {
                    words.push(STILL_PHRASES[rng.random_range(0..STILL_PHRASES.len())])
                }
                (m, Some(s)) => {
                    words.push(VERBS[rng.random_range(0..VERBS.len())]);
                    if !rng.random_bool(P_OMIT_SPEED) {
                        words.push(s.adverb());
                    }
                    words.push(m.name());
                }
            }
        }
        let article = article(words[0]);
        objs.push(format!("{article} {}", words.join(" ")));
    }
    let objects = objs.join(" and ");
    if rng.random_bool(P_OMIT_BACKGROUND) {
        return objects;
    }
    let bg = scene.background.name();
    if rng.random_bool(P_BACKGROUND_FIRST) {
        format!("on a {bg} background , {objects}")
    } else {
        format!("{objects} on a {bg} background")
    }
}

/// Parses a caption into the attributes it states. A word outside the grammar, a word out of
/// place and a caption that stops early are errors naming the word and what was expected.
pub fn parse_caption(text: &str) -> Result<ParsedCaption> {
    let mut p = Parser::new(text);
    let mut background = None;
    let objects;
    if p.peek() == Some("on") {
        background = Some(p.background_phrase()?);
        p.expect(&[","], "\",\" after the background phrase")?;
        objects = p.objects()?;
    } else {
        objects = p.objects()?;
        match p.peek() {
            Some("on") => background = Some(p.background_phrase()?),
            Some(_) => {
                return Err(p.error_here(if objects.len() == 1 {
                    "a motion phrase, \"and\", \"on\" or the end of the caption"
                } else {
                    "a motion phrase, \"on\" or the end of the caption"
                }))
            }
            None => {}
        }
    }
    if p.peek().is_some() {
        return Err(p.error_here("the end of the caption"));
    }
    Ok(ParsedCaption {
        objects,
        background,
    })
}

/// The grammar's fixed words (articles, conjunction, background phrase, the still phrases, the
/// verbs and the speed adverbs); the attribute words are the scene enums' names.
pub const GRAMMAR_WORDS: &[&str] = &[
    "a",
    "an",
    "and",
    "on",
    "background",
    ",",
    "standing",
    "still",
    "not",
    "moving",
    "resting",
    "sliding",
    "going",
    "slowly",
    "quickly",
];

/// Every word the grammar knows.
fn in_vocabulary(w: &str) -> bool {
    GRAMMAR_WORDS.contains(&w)
        || Colour::from_name(w).is_some()
        || Shape::from_name(w).is_some()
        || Size::from_name(w).is_some()
        || Background::from_name(w).is_some()
        || matches!(Motion::from_name(w), Some(m) if m != Motion::Still)
}

struct Parser<'a> {
    text: &'a str,
    /// (normalised word, original word)
    words: Vec<(String, &'a str)>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        let mut words = Vec::new();
        for raw in text.split_whitespace() {
            // A comma glued to a word ("background,") is its own word.
            let (body, comma) = match raw.strip_suffix(',') {
                Some(b) if !b.is_empty() => (b, true),
                _ => (raw, false),
            };
            words.push((body.to_ascii_lowercase(), body));
            if comma {
                words.push((",".to_string(), ","));
            }
        }
        Parser {
            text,
            words,
            pos: 0,
        }
    }

    fn peek(&self) -> Option<&str> {
        self.words.get(self.pos).map(|w| w.0.as_str())
    }

    fn error_here(&self, expected: &str) -> Error {
        match self.words.get(self.pos) {
            None => Error::UnexpectedEnd {
                caption: self.text.to_string(),
                expected: expected.to_string(),
            },
            Some((norm, orig)) => {
                let (caption, word, position, expected) = (
                    self.text.to_string(),
                    orig.to_string(),
                    self.pos + 1,
                    expected.to_string(),
                );
                if in_vocabulary(norm) {
                    Error::UnexpectedWord {
                        caption,
                        word,
                        position,
                        expected,
                    }
                } else {
                    Error::UnknownWord {
                        caption,
                        word,
                        position,
                        expected,
                    }
                }
            }
        }
    }

    /// Consumes the next word if it is one of `options`.
    fn expect(&mut self, options: &[&str], expected: &str) -> Result<String> {
        match self.peek() {
            Some(w) if options.contains(&w) => {
                let w = w.to_string();
                self.pos += 1;
                Ok(w)
            }
            _ => Err(self.error_here(expected)),
        }
    }

    /// Consumes the next word if `f` maps it to a value.
    fn take<T>(&mut self, f: impl Fn(&str) -> Option<T>) -> Option<T> {
        let v = self.peek().and_then(f)?;
        self.pos += 1;
        Some(v)
    }

    fn need<T>(&mut self, f: impl Fn(&str) -> Option<T>, expected: &str) -> Result<T> {
        self.take(f).ok_or_else(|| self.error_here(expected))
    }

    fn objects(&mut self) -> Result<Vec<ParsedObject>> {
        let mut v = vec![self.object()?];
        if self.peek() == Some("and") {
            self.pos += 1;
            v.push(self.object()?);
        }
        Ok(v)
    }

    fn object(&mut self) -> Result<ParsedObject> {
        self.expect(
            &["a", "an"],
            "an article (\"a\" or \"an\") starting an object",
        )?;
        let size = self.take(Size::from_name);
        let colour = self.need(
            Colour::from_name,
            if size.is_some() {
                "a colour (red, orange, yellow, green, cyan, blue, purple, white)"
            } else {
                "a size (small, large) or a colour (red, orange, yellow, green, cyan, blue, purple, white)"
            },
        )?;
        let shape = self.need(
            Shape::from_name,
            "a shape (circle, square, triangle, cross)",
        )?;
        let (mut motion, mut speed) = (None, None);
        match self.peek() {
            Some("standing") => {
                self.pos += 1;
                self.expect(&["still"], "\"still\" after \"standing\"")?;
                motion = Some(Motion::Still);
            }
            Some("not") => {
                self.pos += 1;
                self.expect(&["moving"], "\"moving\" after \"not\"")?;
                motion = Some(Motion::Still);
            }
            Some("resting") => {
                self.pos += 1;
                motion = Some(Motion::Still);
            }
            Some("moving" | "sliding" | "going") => {
                self.pos += 1;
                speed = self.take(|w| match w {
                    "slowly" => Some(Speed::Slow),
                    "quickly" => Some(Speed::Fast),
                    _ => None,
                });
                let dir = |w: &str| Motion::from_name(w).filter(|&m| m != Motion::Still);
                let expected = if speed.is_some() {
                    "a direction (left, right, up, down)"
                } else {
                    "a speed (slowly, quickly) or a direction (left, right, up, down)"
                };
                motion = Some(self.need(dir, expected)?);
            }
            _ => {}
        }
        Ok(ParsedObject {
            colour,
            shape,
            size,
            motion,
            speed,
        })
    }

    fn background_phrase(&mut self) -> Result<Background> {
        self.expect(&["on"], "\"on\" starting the background phrase")?;
        self.expect(&["a", "an"], "\"a\" after \"on\"")?;
        let bg = self.need(
            Background::from_name,
            "a background (black, gray, navy, brown)",
        )?;
        self.expect(
            &["background"],
            "\"background\" after the background colour",
        )?;
        Ok(bg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::{clip_rng, sample_scene, Split};

    #[test]
    fn sampled_captions_parse_back_consistently() {
        let mut omitted = [0usize; 4];
        let mut bg_first = 0;
        let n = 20_000;
        for i in 0..n {
            let split = Split::ALL[i as usize % 3];
            let mut rng = clip_rng(split, 3, i);
            let scene = sample_scene(split, &mut rng);
            let text = caption(&scene, &mut rng);
            assert!(
                !text.contains("  ") && text == text.to_lowercase(),
                "{text}"
            );
            assert!(
                !text.contains("a orange") && !text.contains("an red"),
                "{text}"
            );
            let p = parse_caption(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(p.consistent_with(&scene), "{text} vs {scene:?}");
            for o in &p.objects {
                omitted[0] += o.size.is_none() as usize;
                omitted[1] += o.motion.is_none() as usize;
                omitted[2] +=
                    (o.speed.is_none() && o.motion.is_some_and(|m| m != Motion::Still)) as usize;
            }
            omitted[3] += p.background.is_none() as usize;
            bg_first += text.starts_with("on ") as usize;
        }
        // The omission rates the spec sets, within sampling error.
        let objs: f64 = omitted[0] as f64 / P_OMIT_SIZE; // ~ number of objects
        assert!(
            (omitted[1] as f64 / objs - P_OMIT_MOTION).abs() < 0.01,
            "{omitted:?}"
        );
        assert!(
            (omitted[3] as f64 / n as f64 - P_OMIT_BACKGROUND).abs() < 0.01,
            "{omitted:?}"
        );
        assert!(
            (bg_first as f64 / n as f64 - 0.4).abs() < 0.015,
            "{bg_first}"
        );
    }

    #[test]
    fn parses_both_templates_and_open_attributes() {
        let p = parse_caption("on a navy background , an orange cross going quickly up and a small white circle resting")
            .unwrap();
        assert_eq!(p.background, Some(Background::Navy));
        assert_eq!(
            p.objects[0],
            ParsedObject {
                colour: Colour::Orange,
                shape: Shape::Cross,
                size: None,
                motion: Some(Motion::Up),
                speed: Some(Speed::Fast)
            }
        );
        assert_eq!(p.objects[0].open(), vec![Attribute::Size]);
        assert_eq!(p.objects[1].motion, Some(Motion::Still));
        assert!(p.objects[1].open().is_empty());
        let q = parse_caption("a large red square not moving on a brown background").unwrap();
        assert_eq!(q.background, Some(Background::Brown));
        assert_eq!(q.objects.len(), 1);
        let r = parse_caption("a green triangle sliding left").unwrap();
        assert_eq!(r.objects[0].open(), vec![Attribute::Size, Attribute::Speed]);
        assert_eq!(r.background, None);
        let s = parse_caption("a blue circle").unwrap();
        assert_eq!(
            s.objects[0].open(),
            vec![Attribute::Size, Attribute::Motion, Attribute::Speed]
        );
        // Lenient forms.
        assert_eq!(
            parse_caption("On a navy background, An orange cross going quickly up")
                .unwrap()
                .objects
                .len(),
            1
        );
    }

    #[test]
    fn errors_name_the_word() {
        let cases = [
            (
                "a red hexagon",
                "\"hexagon\"",
                "not in the Shapes World grammar",
            ),
            (
                "a red circle moving fast left",
                "\"fast\"",
                "not in the Shapes World grammar",
            ),
            ("a red moving circle", "\"moving\"", "out of place"),
            (
                "a red circle and a blue square and a green cross",
                "\"and\"",
                "out of place",
            ),
            (
                "a red circle on a green background",
                "\"green\"",
                "expected a background",
            ),
            (
                "on a black background a red circle",
                "\"a\"",
                "expected \",\"",
            ),
            ("a red", "ends too early", "expected a shape"),
            ("", "ends too early", "article"),
            ("a red circle moving slowly", "ends too early", "direction"),
        ];
        for (text, a, b) in cases {
            let e = parse_caption(text).unwrap_err().to_string();
            assert!(e.contains(a) && e.contains(b), "{text:?}: {e}");
        }
    }
}
