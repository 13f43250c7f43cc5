"""ImageNet class labels → simple nouns usable as text concepts, and WordNet id look-up.

ImageNet-Segmentation images are identified by ``<wnid>_<number>`` (e.g. ``n02085936_1234``);
the class is the WordNet noun synset ``wnid``. Two steps turn it into a concept word:

1. :class:`SynsetLabeler` resolves the wnid to its label, the synset's first lemma with
   spaces (``n02085936`` → ``"Maltese dog"``; the same string as the first synonym of the
   ImageNet devkit's ``synset_words.txt`` line). Sources, in order: an explicit mapping or a
   ``synset_words``-style file, then the WordNet 3.0 database file ``data.noun`` (Debian
   package ``wordnet-base`` → ``/usr/share/wordnet``, an NLTK ``wordnet`` corpus directory, or
   ``$WORDNET_DIR`` / ``$WNSEARCHDIR``; the synset offset is the byte offset in that file).
   With no source the wnid itself is returned (a warning is issued once).
2. :func:`simple_noun` maps the label to a basic-level noun with the table
   :data:`SIMPLE_NOUNS` (e.g. ``"Maltese dog"``, ``"golden retriever"`` → ``"dog"``,
   ``"tabby"`` → ``"cat"``, ``"airliner"`` → ``"airplane"``); labels not in the table use the
   heuristic *last word of the first synonym, lowercased* (``"tiger shark"`` → ``"shark"``,
   ``"sports car"`` → ``"car"``). A few labels are ambiguous across synsets (``crane`` the bird
   and the machine, ``maillot``, ``mouse``); :data:`WNID_SIMPLE_NOUNS` resolves those by wnid.

The table covers the ImageNet-1k labels for which the heuristic gives a poor concept
(breeds, species with obscure names, objects whose last word is not the object); it is keyed
by the label exactly as WordNet spells it (case matters only for ``Cardigan`` the dog versus
``cardigan`` the sweater) and falls back to a case-insensitive match. The reference
implementation uses a similar hand-made JSON map (``imagenet_class_map.json``) keyed by the
same first-lemma label.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "SIMPLE_NOUNS",
    "WNID_SIMPLE_NOUNS",
    "simple_noun",
    "SynsetLabeler",
    "WordNetNouns",
    "read_synset_words",
    "find_wordnet_data_noun",
]

# "target noun: label; label; ..." — one group per line, parsed into SIMPLE_NOUNS below.
_GROUPS = """
dog: Chihuahua; Japanese spaniel; Maltese dog; Pekinese; Shih-Tzu; Blenheim spaniel; papillon;
 toy terrier; Rhodesian ridgeback; Afghan hound; basset; beagle; bloodhound; bluetick;
 black-and-tan coonhound; Walker hound; English foxhound; redbone; borzoi; Irish wolfhound;
 Italian greyhound; whippet; Ibizan hound; Norwegian elkhound; otterhound; Saluki;
 Scottish deerhound; Weimaraner; Staffordshire bullterrier; American Staffordshire terrier;
 Bedlington terrier; Border terrier; Kerry blue terrier; Irish terrier; Norfolk terrier;
 Norwich terrier; Yorkshire terrier; wire-haired fox terrier; Lakeland terrier;
 Sealyham terrier; Airedale; cairn; Australian terrier; Dandie Dinmont; Boston bull;
 miniature schnauzer; giant schnauzer; standard schnauzer; Scotch terrier; Tibetan terrier;
 silky terrier; soft-coated wheaten terrier; West Highland white terrier; Lhasa;
 flat-coated retriever; curly-coated retriever; golden retriever; Labrador retriever;
 Chesapeake Bay retriever; German short-haired pointer; vizsla; English setter; Irish setter;
 Gordon setter; Brittany spaniel; clumber; English springer; Welsh springer spaniel;
 cocker spaniel; Sussex spaniel; Irish water spaniel; kuvasz; schipperke; groenendael;
 malinois; briard; kelpie; komondor; Old English sheepdog; Shetland sheepdog; collie;
 Border collie; Bouvier des Flandres; Rottweiler; German shepherd; Doberman;
 miniature pinscher; Greater Swiss Mountain dog; Bernese mountain dog; Appenzeller;
 EntleBucher; boxer; bull mastiff; Tibetan mastiff; French bulldog; Great Dane;
 Saint Bernard; Eskimo dog; malamute; Siberian husky; dalmatian; affenpinscher; basenji; pug;
 Leonberg; Newfoundland; Great Pyrenees; Samoyed; Pomeranian; chow; keeshond;
 Brabancon griffon; Pembroke; Cardigan; toy poodle; miniature poodle; standard poodle;
 Mexican hairless; dingo; dhole; African hunting dog; puppy; pooch; cur; hound; terrier
cat: tabby; tiger cat; Persian cat; Siamese cat; Egyptian cat; kitty; mouser;
 Angora cat; Manx; Maltese cat
wolf: timber wolf; white wolf; red wolf
bear: brown bear; American black bear; ice bear; sloth bear
panda: giant panda; lesser panda
elephant: Indian elephant; African elephant; tusker
rabbit: wood rabbit; Angora; hare
horse: sorrel; pony; mustang; stallion; mare; foal; palomino; pinto; Arabian; thoroughbred
pig: hog; piglet
boar: wild boar
cow: ox; cattle; calf; heifer; dairy cattle
sheep: ram; bighorn; ewe; lamb
goat: ibex
antelope: hartebeest; impala; gazelle
camel: Arabian camel; dromedary; Bactrian camel
monkey: guenon; patas; macaque; langur; colobus; proboscis monkey; marmoset; capuchin;
 howler monkey; titi; spider monkey; squirrel monkey
gibbon: siamang
lemur: Madagascar cat; indri
kangaroo: wallaby
whale: grey whale; killer whale
weasel: polecat; black-footed ferret
squirrel: fox squirrel
bird: brambling; goldfinch; house finch; junco; indigo bunting; bulbul; chickadee; water ouzel;
 kite; black grouse; ptarmigan; ruffed grouse; prairie chicken; coucal; bee eater; hornbill;
 jacamar; spoonbill; bittern; limpkin; bustard; ruddy turnstone; red-backed sandpiper;
 redshank; dowitcher; oystercatcher; jay; robin; magpie; water ouzel; partridge; quail
rooster: cock
chicken: hen
eagle: bald eagle
owl: great grey owl
parrot: African grey; macaw; sulphur-crested cockatoo; lorikeet
duck: drake; red-breasted merganser
snake: thunder snake; ringneck snake; hognose snake; green snake; king snake; garter snake;
 water snake; vine snake; night snake; boa constrictor; rock python; Indian cobra;
 green mamba; sea snake; horned viper; diamondback; sidewinder
turtle: loggerhead; leatherback turtle; mud turtle; terrapin; box turtle
lizard: banded gecko; common iguana; American chameleon; whiptail; agama; frilled lizard;
 alligator lizard; Gila monster; green lizard; African chameleon; Komodo dragon
crocodile: African crocodile
alligator: American alligator
frog: bullfrog; tree frog; tailed frog
salamander: European fire salamander; spotted salamander; axolotl
newt: common newt; eft
fish: tench; barracouta; coho; rock beauty; anemone fish; sturgeon; gar; lionfish; puffer;
 goldfish
shark: great white shark; tiger shark; hammerhead
ray: electric ray; stingray
spider: harvestman; black and gold garden spider; barn spider; garden spider; black widow;
 tarantula; wolf spider
worm: flatworm; nematode
shell: conch
slug: sea slug
crab: Dungeness crab; rock crab; fiddler crab; king crab; hermit crab
lobster: American lobster; spiny lobster
beetle: tiger beetle; ladybug; ground beetle; long-horned beetle; leaf beetle; dung beetle;
 rhinoceros beetle; weevil
insect: walking stick; leafhopper; lacewing; isopod
dragonfly: damselfly
butterfly: admiral; ringlet; monarch; cabbage butterfly; sulphur butterfly; lycaenid
sea urchin: sea urchin
sea anemone: sea anemone
sea cucumber: sea cucumber
guinea pig: guinea pig
person: ballplayer; groom; scuba diver
airplane: airliner; warplane; aeroplane; plane
ship: aircraft carrier; container ship; liner; pirate; schooner; wreck
boat: canoe; catamaran; fireboat; lifeboat; speedboat; trimaran; yawl; gondola
car: beach wagon; cab; convertible; jeep; limousine; Model T; racer; sports car; minivan
bus: minibus; school bus; trolleybus
truck: fire engine; garbage truck; pickup; tow truck; trailer truck; moving van; police van
train: bullet train; electric locomotive; steam locomotive; passenger car; freight car;
 streetcar
bicycle: bicycle-built-for-two; mountain bike; tricycle; unicycle
motorcycle: moped; motor scooter
vehicle: amphibian; half track; recreational vehicle; snowmobile; golfcart; go-kart
sled: dogsled; bobsled
cart: horse cart; oxcart; jinrikisha; barrow; shopping cart
trash can: ashcan
beehive: apiary
pen: ballpoint; fountain pen; quill
bandage: Band Aid
railing: bannister
crib: bassinet; cradle
lighthouse: beacon
hat: bearskin; bonnet; sombrero; cowboy hat; mortarboard
tower: bell cote; water tower
bra: brassiere
armor: breastplate; chain mail; cuirass
pot: caldron; Crock Pot; Dutch oven; pot
sweater: cardigan; sweatshirt
toolkit: carpenter's kit
box: carton; pencil box; crate
ATM: cash machine
cassette player: cassette player
CD player: CD player
phone: cellular telephone; dial telephone; pay-phone
dresser: chiffonier
bell: chime
theater: cinema
knife: cleaver; letter opener
shoe: clog; Loafer; running shoe; sandal
trumpet: cornet
computer: desktop computer; hand-held computer; notebook; laptop
rag: dishrag
mat: doormat
oil rig: drilling platform
cabinet: entertainment center; china cabinet; medicine chest; file
coffee maker: espresso maker
scarf: feather boa; stole
screen: fire screen; shoji; window screen
bed: four-poster
horn: French horn
mask: gasmask; ski mask; oxygen mask
hair clip: hair slide
hair dryer: hand blower
hard drive: hard disc
basket: hamper; shopping basket
axe: hatchet
skirt: hoopskirt; miniskirt; overskirt; sarong
pumpkin: jack-o'-lantern
jeans: jean
shirt: jersey
lamp: lampshade; table lamp
lawn mower: lawn mower
magnifier: loupe
sawmill: lumbermill
swimsuit: swimming trunks
xylophone: marimba
match: matchstick
stone: megalith
trailer: mobile home
bowl: mortar; mixing bowl; soup bowl
baby bottle: nipple
speedometer: odometer
flute: panpipe
lock: padlock; combination lock
brush: paintbrush
pajamas: pajama
printer: photocopier
guitar pick: pick
helmet: pickelhaube; crash helmet; football helmet
jug: pitcher; water jug; whiskey jug
dome: planetarium
missile: projectile
satellite dish: radio telescope; solar dish
remote: remote control
gun: revolver; assault rifle
ruler: rule; slide rule
salt shaker: saltshaker
saxophone: sax
sheath: scabbard
sewing machine: sewing machine
slot machine: slot
spaceship: space shuttle
keyboard: space bar; computer keyboard; typewriter keyboard
watch: stopwatch; digital watch
tram: streetcar
couch: studio couch
temple: stupa
sunglasses: sunglass; sunglasses
mop: swab
teddy bear: teddy
roof: thatch; tile roof
harvester: thresher; harvester
toilet: toilet seat
piano: upright; grand piano
vacuum cleaner: vacuum
ceiling: vault
fabric: velvet
robe: vestment; abaya; kimono
bridge: viaduct; steel arch bridge; suspension bridge
waffle maker: waffle iron
sink: washbasin
washing machine: washer
blind: window shade
tie: Windsor tie; bolo tie; bow tie
spoon: wooden spoon
yarn: wool
tent: yurt; mountain tent
website: web site
book: book jacket; comic book
traffic light: traffic light
soup: consomme; hot pot
dessert: trifle
popsicle: ice lolly
bread: French loaf
burger: cheeseburger
hot dog: hotdog
mashed potato: mashed potato
squash: spaghetti squash; acorn squash; butternut squash
vegetable: cardoon
apple: Granny Smith
fruit: jackfruit; custard apple
pasta: carbonara
meatloaf: meat loaf
pie: potpie
coffee: espresso
drink: eggnog
mountain: alp
cliff: promontory
beach: sandbar; seashore
lake: lakeside
flower: rapeseed; daisy; yellow lady's slipper
rose hip: hip
nut: buckeye
mushroom: coral fungus; agaric; gyromitra; stinkhorn; earthstar; hen-of-the-woods; bolete
corn: ear
toilet paper: toilet tissue
fence: chainlink fence; picket fence; worm fence
balance beam: balance beam
parallel bars: parallel bars
horizontal bar: horizontal bar
guillotine: guillotine
fan: electric fan
"""


def _parse_groups(text: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for line in re.sub(r"\n\s+", " ", text.strip()).splitlines():
        target, _, labels = line.partition(":")
        for label in labels.split(";"):
            label = label.strip()
            if label:
                table[label] = target.strip()
    return table


#: Label (first synonym, WordNet spelling) → simple noun.
SIMPLE_NOUNS: dict[str, str] = _parse_groups(_GROUPS)
_SIMPLE_NOUNS_LOWER: dict[str, str] = {}
for _k, _v in SIMPLE_NOUNS.items():
    _SIMPLE_NOUNS_LOWER.setdefault(_k.lower(), _v)

#: Synsets whose label is shared with another synset (resolved by wnid first).
WNID_SIMPLE_NOUNS: dict[str, str] = {
    "n02012849": "bird",  # crane, the bird
    "n03126707": "crane",  # crane, the machine
    "n03710637": "tights",  # maillot (dancer's tights)
    "n03710721": "swimsuit",  # maillot, tank suit
    "n03793489": "computer mouse",  # mouse, computer mouse
    "n02330245": "mouse",  # mouse, the rodent
    "n03954731": "hand plane",  # plane, carpenter's plane
    "n02113186": "dog",  # Cardigan (Welsh corgi)
    "n02963159": "sweater",  # cardigan
    "n03991062": "flowerpot",  # pot, flowerpot
}


def simple_noun(label: str, wnid: str | None = None) -> str:
    """Simple text concept for an ImageNet label such as ``"Maltese dog, Maltese terrier"``.

    Order: :data:`WNID_SIMPLE_NOUNS` (when ``wnid`` is given), then :data:`SIMPLE_NOUNS` on the
    first synonym (exact, then case-insensitive), then the last word of the first synonym,
    lowercased (``"tiger shark"`` → ``"shark"``). Underscores count as spaces.
    """
    if wnid is not None and wnid in WNID_SIMPLE_NOUNS:
        return WNID_SIMPLE_NOUNS[wnid]
    first = label.split(",")[0].replace("_", " ").strip()
    if first in SIMPLE_NOUNS:
        return SIMPLE_NOUNS[first]
    if first.lower() in _SIMPLE_NOUNS_LOWER:
        return _SIMPLE_NOUNS_LOWER[first.lower()]
    words = first.split()
    return words[-1].lower() if words else first.lower()


# --------------------------------------------------------------------------------------------
# wnid → label
# --------------------------------------------------------------------------------------------


def read_synset_words(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a devkit-style file of ``<wnid> <label>[, <synonym>...]`` lines into a dict."""
    mapping: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and re.fullmatch(r"n\d{8}", parts[0]):
            mapping[parts[0]] = parts[1].strip()
    return mapping


def _wordnet_candidates() -> list[Path]:
    dirs: list[Path] = []
    for var in ("WORDNET_DIR", "WNSEARCHDIR"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    nltk_roots = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    nltk_roots += [Path.home() / "nltk_data", Path("/usr/share/nltk_data"),
                   Path("/usr/local/share/nltk_data"), Path("/usr/lib/nltk_data"),
                   Path("/usr/local/lib/nltk_data")]
    dirs += [r / "corpora" / "wordnet" for r in nltk_roots]
    dirs += [Path("/usr/share/wordnet"), Path("/usr/share/wordnet/dict"),
             Path("/usr/local/WordNet-3.0/dict"), Path("/opt/homebrew/share/wordnet/dict")]
    return dirs


def find_wordnet_data_noun(directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Path of WordNet's ``data.noun`` in ``directory`` or a standard location, else None."""
    dirs = [Path(directory)] if directory is not None else _wordnet_candidates()
    for d in dirs:
        for name in ("data.noun", "noun.dat"):
            if (d / name).is_file():
                return d / name
    return None


class WordNetNouns:
    """Reads noun synsets from a WordNet 3.0 ``data.noun`` file by offset (lazy, cached).

    In WordNet's database format a synset's offset is the byte offset of its line, so a look-up
    is one ``seek``; ImageNet wnids are ``"n"`` + that 8-digit offset.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cache: dict[int, list[str]] = {}

    def lemmas(self, wnid: str) -> list[str] | None:
        """Lemmas of the noun synset ``wnid`` (underscores → spaces), or None if absent."""
        m = re.fullmatch(r"n(\d{8})", wnid)
        if not m:
            return None
        offset = int(m.group(1))
        if offset not in self._cache:
            with open(self.path, "rb") as f:
                f.seek(offset)
                line = f.readline().decode("utf-8", errors="replace")
            fields = line.split()
            if len(fields) < 4 or fields[0] != m.group(1) or fields[2] != "n":
                return None
            count = int(fields[3], 16)
            words = fields[4:4 + 2 * count:2]
            # Adjective markers such as "(p)" never occur on nouns, but strip defensively.
            self._cache[offset] = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words]
        return self._cache[offset]


class SynsetLabeler:
    """Resolves ImageNet wnids to labels (see the module docstring for the sources)."""

    def __init__(self, synset_labels: Mapping[str, str] | str | os.PathLike[str] | None = None,
                 wordnet_dir: str | os.PathLike[str] | None = None) -> None:
        if synset_labels is None:
            self.mapping: dict[str, str] = {}
        elif isinstance(synset_labels, Mapping):
            self.mapping = dict(synset_labels)
        else:
            self.mapping = read_synset_words(synset_labels)
        data_noun = find_wordnet_data_noun(wordnet_dir)
        self.wordnet = WordNetNouns(data_noun) if data_noun is not None else None
        self._warned = False

    def label(self, wnid: str) -> str:
        """Label of ``wnid``: its first synonym (``"Maltese dog"``), or ``wnid`` if unknown."""
        if wnid in self.mapping:
            return self.mapping[wnid].split(",")[0].strip()
        if self.wordnet is not None:
            lemmas = self.wordnet.lemmas(wnid)
            if lemmas:
                return lemmas[0]
        if not self._warned:
            warnings.warn(f"no label source knows {wnid!r}: pass synset_labels (a devkit "
                          "synset_words file) or install WordNet (e.g. Debian's wordnet-base); "
                          "using the wnid as the class name", stacklevel=2)
            self._warned = True
        return wnid
