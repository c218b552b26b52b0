//! The vocabulary: symbols ↔ token ids, saved beside a model so weights never lose it.
//! Runs on: any thread that may allocate (built offline, read by the worker).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::encode::Symbol;

/// Index of a symbol in a `Vocab`; the row of the model's embedding and output layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub u16);

/// A symbol the vocabulary does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("symbol '{symbol}' is not in the vocabulary")]
pub struct UnknownSymbol {
    pub symbol: Symbol,
}

/// An ordered set of symbols. Serialised as the list of symbol texts, in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    symbols: Vec<Symbol>,
    ids: HashMap<Symbol, TokenId>,
}

impl Vocab {
    /// A vocabulary of the distinct symbols given, in the recipe's order: pitches ascending,
    /// then `/`, `_`, `r`.
    pub fn from_symbols(symbols: impl IntoIterator<Item = Symbol>) -> Self {
        let mut sorted: Vec<Symbol> = symbols.into_iter().collect();
        sorted.sort();
        sorted.dedup();
        Self::from_ordered(sorted)
    }

    /// Every pitch in `lowest..=highest` plus the three special symbols.
    pub fn for_pitch_range(lowest: u8, highest: u8) -> Self {
        let pitches = (lowest..=highest).map(Symbol::Pitch);
        Self::from_symbols(pitches.chain([Symbol::Delimiter, Symbol::Hold, Symbol::Rest]))
    }

    fn from_ordered(symbols: Vec<Symbol>) -> Self {
        let ids = symbols.iter().enumerate().map(|(i, s)| (*s, TokenId(i as u16))).collect();
        Self { symbols, ids }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The symbols in id order.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// The id of `symbol`, if present.
    pub fn id(&self, symbol: Symbol) -> Option<TokenId> {
        self.ids.get(&symbol).copied()
    }

    /// The symbol of `id`. Panics on an id from another vocabulary, which is a bug.
    pub fn symbol(&self, id: TokenId) -> Symbol {
        self.symbols[id.0 as usize]
    }

    /// Ids of all the symbols, or the first one that is missing.
    pub fn encode(&self, symbols: &[Symbol]) -> Result<Vec<TokenId>, UnknownSymbol> {
        symbols.iter().map(|&symbol| self.id(symbol).ok_or(UnknownSymbol { symbol })).collect()
    }

    /// Lowest and highest pitch in the vocabulary, if it has any pitch.
    pub fn pitch_range(&self) -> Option<(u8, u8)> {
        let mut pitches = self.symbols.iter().filter_map(|s| match s {
            Symbol::Pitch(p) => Some(*p),
            _ => None,
        });
        let first = pitches.next()?;
        Some(pitches.fold((first, first), |(lo, hi), p| (lo.min(p), hi.max(p))))
    }
}

impl Serialize for Vocab {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.symbols.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let symbols = Vec::<Symbol>::deserialize(deserializer)?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = symbols.iter().find(|s| !seen.insert(**s)) {
            return Err(serde::de::Error::custom(format!("symbol '{dup}' appears twice in the vocabulary")));
        }
        Ok(Self::from_ordered(symbols))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_order_and_serde_round_trip() {
        let v = Vocab::from_symbols([
            Symbol::Rest,
            Symbol::Pitch(72),
            Symbol::Hold,
            Symbol::Pitch(60),
            Symbol::Delimiter,
            Symbol::Pitch(72),
        ]);
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"["60","72","/","_","r"]"#);
        let back: Vocab = serde_json::from_str(r#"["60","72","/","_","r"]"#).unwrap();
        assert_eq!(back, v);
        assert_eq!(v.id(Symbol::Pitch(72)), Some(TokenId(1)));
        assert_eq!(v.symbol(TokenId(4)), Symbol::Rest);
        assert_eq!(v.pitch_range(), Some((60, 72)));
        assert_eq!(v.encode(&[Symbol::Pitch(61)]), Err(UnknownSymbol { symbol: Symbol::Pitch(61) }));
    }

    #[test]
    fn refuses_junk_when_loading() {
        assert!(serde_json::from_str::<Vocab>(r#"["60","60"]"#).is_err());
        assert!(serde_json::from_str::<Vocab>(r#"["60","x"]"#).is_err());
        assert!(serde_json::from_str::<Vocab>(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn pitch_range_vocab_has_every_pitch() {
        let v = Vocab::for_pitch_range(48, 84);
        assert_eq!(v.len(), 37 + 3);
        assert_eq!(v.pitch_range(), Some((48, 84)));
    }
}
