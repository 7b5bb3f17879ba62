//! Fuzzes the start-up profile decoder: any input is a profile or an error, never a
//! panic; a profile that decodes encodes to a document that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::profile::StartupProfile;

fuzz_target!(|data: &[u8]| {
    if let Ok(profile) = StartupProfile::decode(data) {
        let again = StartupProfile::decode(&profile.encode()).expect("re-encoded profile decodes");
        assert_eq!(again, profile);
    }
});
