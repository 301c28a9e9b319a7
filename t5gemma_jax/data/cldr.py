"""English -> other-language phrase pairs from the CLDR data that babel ships (no download).

Every category reads the same key out of the English and the target locale's tables, so a pair
is a translation CLDR itself vouches for. Keys are `<group>` or `<group>#<variant>`:

* names: `territory:DE`, `language:de`, `currency:USD`, `script:Cyrl`, `variant:1901`,
  `measurement:metric`, `locale:de_AT` (a locale's display name, "German (Austria)"),
  `unit:length-kilometer` (long name; `#short`, `#narrow`), `city:Europe/Paris`,
  `metazone:Europe_Central#standard` and `zone:Europe/London#daylight` (time zone names);
* calendar words: `month:1` (stand-alone wide; `#format-wide`, `#format-abbreviated`, ...),
  `weekday:0`, `quarter:1#format-wide`, `era:0#wide`, `day-period:noon#stand-alone-wide`;
* counted phrases, where CLDR's plural rules pick a different form in each language
  ("5 kilometers" -> "5 километров"): `unit:length-kilometer#long:5`, `currency:USD#count:2`,
  `relative:year#past:21` ("21 years ago").

`corpora.split_of` hashes only the group (the part before "#"), so all forms of one name - its
abbreviations, its counted phrases - land in the same split: a model never sees "2 kilometers"
in training and is then scored on "5 kilometers". A counted phrase is kept once per distinct
pair of plural forms (German "2 Kilometer" and "5 Kilometer" use the same form, so only one
stays), an exact (source, target) pair is kept once across all groups (the first, in category
order), and pairs that are empty or left untranslated (target equal to source) are dropped.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

GROUP_SEPARATOR = "#"
# One number per plural form that English, German and Russian distinguish: 1 (one/one),
# 2 (other/few), 5 (other/many), 21 (other/one in Russian), 1.5 (other/other: a fraction).
COUNTS = (1, 2, 5, 21, 1.5)
# Narrow calendar widths are single letters ("J" is January, June and July): not translations.
_CALENDAR_FORMS = (("stand-alone", "wide"), ("format", "wide"), ("stand-alone", "abbreviated"),
                   ("format", "abbreviated"))
_NUMBER = re.compile(r"[\d.,]+")
_UNIT_WIDTHS = ("long", "short", "narrow")
_COUNTED_UNIT_WIDTHS = ("long", "short")

# An entry of one locale: key -> (text, form). `form` names the plural form (with the variant)
# a counted phrase was built from, None for a plain name.
Entries = dict[str, tuple[str, Optional[str]]]


def group_of(key: str) -> str:
  """The part of a pair key that decides its split: everything before "#"."""
  return key.split(GROUP_SEPARATOR, 1)[0]


def pairs(target_locale: str) -> list[tuple[str, str, str]]:
  """English -> `target_locale` phrases from babel's CLDR data.

  Args:
    target_locale: a CLDR locale id such as "ru" or "de".

  Returns:
    (key, English text, target text) triples sorted by key, whitespace-normalised, with the
    filtering described in the module docstring.

  Raises:
    ValueError: babel does not know `target_locale`.
  """
  import babel  # pylint: disable=import-outside-toplevel
  try:
    en, target = _private_locale("en"), _private_locale(target_locale)
  except (ValueError, babel.UnknownLocaleError) as e:
    raise ValueError(f"cldr: unknown locale {target_locale!r}: {e}") from None
  out: dict[str, tuple[str, str]] = {}
  seen_texts: set[tuple[str, str]] = set()
  seen_forms: set[tuple[str, str, str]] = set()
  for extract in _CATEGORIES:
    source_entries, target_entries = extract(en, target), extract(target, target)
    for key in source_entries:  # babel's table order, counted phrases in COUNTS order
      if key not in target_entries:
        continue
      (source, source_form), (translated, target_form) = source_entries[key], target_entries[key]
      source, translated = " ".join(source.split()), " ".join(translated.split())
      if not source or not translated or source == translated or (source, translated) in seen_texts:
        continue
      if source_form is not None:
        if _NUMBER.sub("", source) == _NUMBER.sub("", translated):
          continue  # "1.5 nm" -> "1,5 nm" teaches the decimal comma only
        forms = (group_of(key), source_form, target_form or "")
        if forms in seen_forms:
          continue
        seen_forms.add(forms)
      seen_texts.add((source, translated))
      out[key] = (source, translated)
  return [(key, *out[key]) for key in sorted(out)]


def _private_locale(identifier: str):
  """A babel Locale whose CLDR tables no other Locale object shares.

  babel (2.18) writes each resolved alias back into the table it was read from, and a locale
  that does not override a table shares its parent's dict: reading German stand-alone
  quarters (an alias of the format ones) stores "1. Quartal" in root's table, and Russian then
  reads "1. Quartal" too. Loading the data with babel's cache swapped for an empty one gives
  this Locale fresh dicts, so the extraction neither sees nor leaves such traces.
  """
  from babel import Locale, localedata  # pylint: disable=import-outside-toplevel
  parsed = Locale.parse(identifier)
  private = Locale(parsed.language, parsed.territory, parsed.script, parsed.variant)
  # pylint: disable=protected-access
  with localedata._cache_lock:  # an RLock: `load` takes it again inside
    shared, localedata._cache = localedata._cache, {}
    try:
      data = localedata.load(private._Locale__data_identifier)
    finally:
      localedata._cache = shared
  private._Locale__data = localedata.LocaleDataDict(data)
  return private


# ------------------------------------------------------------------------------- categories
# Each category is `fn(locale, target) -> Entries` for one locale; `target` is the target
# locale in both calls, for tables whose key set only the target defines (its time zones).


def _names(attribute: str, category: str) -> Callable:
  def extract(locale, target) -> Entries:
    del target
    return {f"{category}:{code}": (name, None) for code, name in getattr(locale, attribute).items()
            if isinstance(name, str)}
  return extract


def _locale_names(locale, target) -> Entries:
  """Display names of every locale babel has, "German (Austria)": language plus details.

  babel's own `get_display_name` silently leaves out a detail the locale has no name for,
  which would pair "Serbian (Latin, Bosnia)" with a target lacking "Latin"; such names are
  skipped here instead.
  """
  del target
  from babel import Locale, localedata  # pylint: disable=import-outside-toplevel
  out = {}
  for identifier in localedata.locale_identifiers():
    try:
      parsed = Locale.parse(identifier)
    except (ValueError, LookupError):
      continue
    parts = [(locale.languages, parsed.language), (locale.scripts, parsed.script),
             (locale.territories, parsed.territory), (locale.variants, parsed.variant)]
    names = [table.get(code) for table, code in parts if code]
    if len(names) > 1 and all(names):  # a bare language is already a `language:` pair
      out[f"locale:{identifier}"] = (f"{names[0]} ({', '.join(names[1:])})", None)
  return out


def _calendar(attribute: str, category: str, forms=_CALENDAR_FORMS, base=("stand-alone", "wide")):
  """Months, weekdays, quarters or day periods in each (context, width); `base` is keyed bare."""
  def extract(locale, target) -> Entries:
    del target
    out = {}
    table = getattr(locale, attribute)
    for context, width in forms:
      for code, name in table.get(context, {}).get(width, {}).items():
        variant = "" if (context, width) == base else f"#{context}-{width}"
        if isinstance(name, str):
          out[f"{category}:{code}{variant}"] = (name, None)
    return out
  return extract


def _eras(locale, target) -> Entries:
  del target
  return {f"era:{code}#{width}": (name, None) for width in ("wide", "abbreviated")
          for code, name in locale.eras.get(width, {}).items()}


def _unit_names(locale, target) -> Entries:
  del target
  # babel has no public list of unit ids; the locale's own table is the only enumeration.
  names = locale._data.get("unit_display_names", {})  # pylint: disable=protected-access
  return {f"unit:{unit}" + ("" if width == "long" else f"#{width}"): (names[unit][width], None)
          for unit in names for width in _UNIT_WIDTHS if names[unit].get(width)}


def _counted(locale, patterns: dict, key: str, variant: str, out: Entries,
             fill: Callable[[str, str], Optional[str]] = lambda pattern, form: pattern) -> None:
  """Adds `key#variant:n` for each of COUNTS: the pattern of n's plural form, with n in it."""
  from babel import numbers  # pylint: disable=import-outside-toplevel
  for count in COUNTS:
    form = locale.plural_form(count)
    pattern = patterns.get(form) or patterns.get("other")
    text = fill(pattern, form) if isinstance(pattern, str) else None
    if text and "{0}" in text:
      out[f"{key}#{variant}:{count}"] = (
          text.replace("{0}", numbers.format_decimal(count, locale=locale)), f"{variant}:{form}")


def _unit_counts(locale, target) -> Entries:
  del target
  patterns = locale._data.get("unit_patterns", {})  # pylint: disable=protected-access
  out: Entries = {}
  for unit in patterns:
    for width in _COUNTED_UNIT_WIDTHS:
      _counted(locale, dict(patterns[unit].get(width, {})), f"unit:{unit}", width, out)
  return out


def _currency_counts(locale, target) -> Entries:
  """"2 US dollars": CLDR's currency unit pattern around the plural name of the currency."""
  del target
  data = locale._data  # pylint: disable=protected-access
  unit_patterns = dict(data.get("currency_unit_patterns", {}))
  out: Entries = {}
  for code, plurals in data.get("currency_names_plural", {}).items():
    plurals = dict(plurals)

    def fill(pattern: str, form: str, plurals=plurals) -> Optional[str]:
      name = plurals.get(form) or plurals.get("other")
      return pattern.replace("{1}", name) if name else None

    # The unit pattern is "{0} {1}" in most locales; pick it by the same plural form.
    patterns = {form: unit_patterns.get(form) or unit_patterns.get("other")
                for form in ("zero", "one", "two", "few", "many", "other")}
    _counted(locale, patterns, f"currency:{code}", "count", out, fill)
  return out


def _relative_times(locale, target) -> Entries:
  """"in 5 years", "21 Mondays ago": the relative-time patterns of each date field."""
  del target
  fields = locale._data.get("date_fields", {})  # pylint: disable=protected-access
  out: Entries = {}
  for field, directions in fields.items():
    base, _, width = field.partition("-")
    for direction in ("past", "future"):
      variant = f"{width}-{direction}" if width else direction
      _counted(locale, dict(directions.get(direction, {})), f"relative:{base}", variant, out)
  return out


def _zone_names(locale, target) -> Entries:
  """Long metazone names ("Central European Summer Time") and the few per-zone ones."""
  del target
  out = {}
  for prefix, table in (("metazone", locale.meta_zones), ("zone", locale.time_zones)):
    for zone, names in table.items():
      for kind, name in names.get("long", {}).items():
        if isinstance(name, str):
          out[f"{prefix}:{zone}#{kind}"] = (name, None)
  return out


def _city_names(locale, target) -> Entries:
  """Exemplar city of each zone the target names one for; CLDR omits the obvious English ones."""
  out = {}
  for zone in target.time_zones:
    city = locale.time_zones.get(zone, {}).get("city")
    if city is None and locale.language == "en" and "/" in zone and not zone.startswith("Etc/"):
      city = zone.rsplit("/", 1)[1].replace("_", " ")  # CLDR's own fallback for English
    if city:
      out[f"city:{zone}"] = (city, None)
  return out


# Earlier categories win an exact duplicate pair: plain names before composed phrases.
_CATEGORIES = (
    _names("territories", "territory"), _names("languages", "language"),
    _names("currencies", "currency"), _names("scripts", "script"),
    _names("variants", "variant"), _names("measurement_systems", "measurement"),
    _calendar("months", "month"), _calendar("days", "weekday", _CALENDAR_FORMS + (
        ("stand-alone", "short"), ("format", "short"))),
    _calendar("quarters", "quarter", base=None), _eras,
    _calendar("day_periods", "day-period", base=None),
    _unit_names, _city_names, _zone_names, _locale_names,
    _unit_counts, _currency_counts, _relative_times,
)
