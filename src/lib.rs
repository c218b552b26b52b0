pub mod music;
