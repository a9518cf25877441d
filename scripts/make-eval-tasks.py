"""Writes the workbench's offline evaluation tasks (workbench/evaluation/data/*.jsonl).

Run once; the files are committed. Sources:
- capitals (multiple choice): countries and their capital cities, facts written out for
  this project (MIT, as the project);
- pasttense (short generation): English irregular verbs and their simple past, written
  out for this project (MIT);
- docstrings (cloze, LAMBADA-style last word): sentences of CPython 3.11's standard
  library docstrings (Python Software Foundation License 2.0), with the final word to predict.
"""

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "workbench" / "evaluation" / "data"

CAPITALS = """Afghanistan:Kabul, Albania:Tirana, Algeria:Algiers, Argentina:Buenos Aires,
Armenia:Yerevan, Australia:Canberra, Austria:Vienna, Azerbaijan:Baku, Bangladesh:Dhaka,
Belarus:Minsk, Belgium:Brussels, Bolivia:Sucre, Botswana:Gaborone, Brazil:Brasilia,
Bulgaria:Sofia, Cambodia:Phnom Penh, Cameroon:Yaounde, Canada:Ottawa, Chile:Santiago,
China:Beijing, Colombia:Bogota, Costa Rica:San Jose, Croatia:Zagreb, Cuba:Havana,
Cyprus:Nicosia, Czechia:Prague, Denmark:Copenhagen, Ecuador:Quito, Egypt:Cairo,
Estonia:Tallinn, Ethiopia:Addis Ababa, Finland:Helsinki, France:Paris, Georgia:Tbilisi,
Germany:Berlin, Ghana:Accra, Greece:Athens, Guatemala:Guatemala City, Hungary:Budapest,
Iceland:Reykjavik, India:New Delhi, Indonesia:Jakarta, Iran:Tehran, Iraq:Baghdad,
Ireland:Dublin, Israel:Jerusalem, Italy:Rome, Jamaica:Kingston, Japan:Tokyo, Jordan:Amman,
Kazakhstan:Astana, Kenya:Nairobi, Kuwait:Kuwait City, Latvia:Riga, Lebanon:Beirut,
Libya:Tripoli, Lithuania:Vilnius, Luxembourg:Luxembourg, Madagascar:Antananarivo,
Malaysia:Kuala Lumpur, Mali:Bamako, Malta:Valletta, Mexico:Mexico City,
Mongolia:Ulaanbaatar, Morocco:Rabat, Mozambique:Maputo, Nepal:Kathmandu,
Netherlands:Amsterdam, New Zealand:Wellington, Nicaragua:Managua, Nigeria:Abuja, North
Korea:Pyongyang, Norway:Oslo, Oman:Muscat, Pakistan:Islamabad, Panama:Panama City,
Paraguay:Asuncion, Peru:Lima, Philippines:Manila, Poland:Warsaw, Portugal:Lisbon,
Qatar:Doha, Romania:Bucharest, Russia:Moscow, Rwanda:Kigali, Saudi Arabia:Riyadh,
Senegal:Dakar, Serbia:Belgrade, Singapore:Singapore, Slovakia:Bratislava,
Slovenia:Ljubljana, Somalia:Mogadishu, South Africa:Pretoria, South Korea:Seoul,
Spain:Madrid, Sri Lanka:Colombo, Sudan:Khartoum, Sweden:Stockholm, Switzerland:Bern,
Syria:Damascus, Taiwan:Taipei, Tanzania:Dodoma, Thailand:Bangkok, Tunisia:Tunis,
Turkey:Ankara, Uganda:Kampala, Ukraine:Kyiv, United Kingdom:London, United
States:Washington, Uruguay:Montevideo, Uzbekistan:Tashkent, Venezuela:Caracas,
Vietnam:Hanoi, Yemen:Sanaa, Zambia:Lusaka, Zimbabwe:Harare"""

VERBS = """arise:arose awake:awoke be:was bear:bore beat:beat become:became begin:began
bend:bent bet:bet bind:bound bite:bit bleed:bled blow:blew break:broke breed:bred
bring:brought build:built burst:burst buy:bought catch:caught choose:chose cling:clung
come:came cost:cost creep:crept cut:cut deal:dealt dig:dug do:did draw:drew drink:drank
drive:drove eat:ate fall:fell feed:fed feel:felt fight:fought find:found flee:fled
fling:flung fly:flew forbid:forbade forget:forgot forgive:forgave freeze:froze get:got
give:gave go:went grind:ground grow:grew hang:hung have:had hear:heard hide:hid hit:hit
hold:held hurt:hurt keep:kept kneel:knelt know:knew lay:laid lead:led leave:left
lend:lent let:let lie:lay lose:lost make:made mean:meant meet:met pay:paid put:put
quit:quit read:read ride:rode ring:rang rise:rose run:ran say:said see:saw seek:sought
sell:sold send:sent set:set shake:shook shine:shone shoot:shot shrink:shrank shut:shut
sing:sang sink:sank sit:sat sleep:slept slide:slid speak:spoke spend:spent spin:spun
split:split spread:spread spring:sprang stand:stood steal:stole stick:stuck sting:stung
stink:stank strike:struck swear:swore sweep:swept swim:swam swing:swung take:took
teach:taught tear:tore tell:told think:thought throw:threw wake:woke wear:wore
weave:wove weep:wept win:won wind:wound write:wrote"""

DOC_MODULES = ("argparse", "collections", "json", "pathlib", "shutil", "subprocess",
               "textwrap", "threading", "urllib.parse", "zipfile", "tarfile", "logging",
               "email.message", "http.client", "sqlite3", "csv", "difflib", "heapq")


def pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(p.strip().split(":")) for p in " ".join(text.split()).split(",")]


def capitals() -> list[dict]:
    rows = pairs(CAPITALS)
    rng = random.Random(28)
    docs = []
    for country, city in rows:
        others = rng.sample([c for _, c in rows if c != city], 3)
        choices = others + [city]
        rng.shuffle(choices)
        docs.append({"question": f"What is the capital of {country}?", "choices": choices,
                     "answer": choices.index(city)})
    return docs


def pasttense() -> list[dict]:
    verbs = [tuple(p.split(":")) for p in VERBS.split()]
    return [{"prompt": f"The simple past tense of the verb \"{v}\" is \"", "answer": p}
            for v, p in verbs]


def docstrings() -> list[dict]:
    import importlib
    import inspect

    seen, docs = set(), []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc:
                continue
            for para in doc.split("\n\n"):
                s = " ".join(para.split())
                m = re.fullmatch(r"([A-Z][^>{}\[\]|:=]{60,400}?) ([a-z]{3,15})\.", s)
                if m and s not in seen:
                    seen.add(s)
                    docs.append({"context": m.group(1), "target": m.group(2)})
    random.Random(28).shuffle(docs)
    return docs[:200]


if __name__ == "__main__":
    for name, docs in (("capitals", capitals()), ("pasttense", pasttense()),
                       ("docstrings", docstrings())):
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        print(name, len(docs))
