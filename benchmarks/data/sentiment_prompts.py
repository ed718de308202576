"""Writes sentiment_prompts.jsonl: the controlled-sentiment task's prompts (benchmarks/frontier.py).

Opinion and review prompts on 210 topics of 14 categories, two per topic with different templates, each asking
for a short answer (one or two sentences) so that a 135M model's samples end within a few dozen tokens. The split
is by topic: every 5th topic of each category is held out (84 prompts), so no held-out topic is trained on.

    python benchmarks/data/sentiment_prompts.py        # rewrites the JSONL next to this file (deterministic)
"""
import json
from pathlib import Path

TOPICS = {
    "food": ["pineapple on pizza", "sushi", "dark chocolate", "instant noodles", "kale salad", "street tacos",
             "blue cheese", "pumpkin spice lattes", "fast food burgers", "homemade bread", "spicy curry",
             "vegan ice cream", "black coffee", "airline food", "brussels sprouts"],
    "places": ["Paris", "New York City", "a small mountain village", "Tokyo", "a crowded beach in summer",
               "the Sahara desert", "Venice", "a quiet public library", "Las Vegas", "the Scottish Highlands",
               "a busy airport", "Iceland", "an amusement park", "a rainy seaside town", "the London Underground"],
    "products": ["smartwatches", "electric scooters", "mechanical keyboards", "wireless earbuds",
                 "self-driving cars", "e-readers", "robot vacuum cleaners", "foldable phones", "smart speakers",
                 "standing desks", "noise-cancelling headphones", "instant cameras", "air fryers",
                 "virtual reality headsets", "electric toothbrushes"],
    "films and tv": ["superhero movies", "reality TV shows", "horror films", "romantic comedies",
                     "nature documentaries", "black-and-white classics", "movie remakes", "animated films",
                     "true crime series", "soap operas", "musicals", "sitcoms with laugh tracks", "space operas",
                     "long movie trilogies", "cooking competition shows"],
    "music": ["jazz", "heavy metal", "opera", "country music", "elevator music", "vinyl records",
              "live concerts", "K-pop", "classical piano", "autotuned vocals", "bagpipes", "music festivals",
              "karaoke nights", "reggae", "film soundtracks"],
    "books and learning": ["poetry", "self-help books", "audiobooks", "fantasy novels", "textbooks",
                           "graphic novels", "learning a new language", "online courses", "group projects",
                           "pop quizzes", "book clubs", "math homework", "history lessons", "public speaking",
                           "reading on a phone"],
    "work": ["open-plan offices", "working from home", "Monday meetings", "four-day work weeks",
             "long commutes", "team-building retreats", "job interviews", "unpaid internships", "night shifts",
             "performance reviews", "office coffee", "email newsletters", "dress codes", "coworking spaces",
             "overtime"],
    "technology": ["social media", "video calls", "password rules", "software updates", "chatbots",
                   "smart homes", "cryptocurrency", "online ads", "cloud storage", "face recognition",
                   "mobile games", "streaming services", "group chats", "autocorrect", "QR code menus"],
    "sports and games": ["marathon running", "chess", "golf", "football on TV", "yoga", "board games",
                         "rock climbing", "video game tournaments", "swimming in cold water", "bowling",
                         "the Olympics", "fantasy football", "skiing", "gym memberships", "table tennis"],
    "travel": ["long-haul flights", "road trips", "budget hostels", "cruise ships", "camping in the rain",
               "night trains", "guided bus tours", "hotel breakfasts", "backpacking alone", "theme hotels",
               "travel insurance", "souvenir shops", "packing light", "jet lag", "train stations"],
    "home and daily life": ["doing laundry", "houseplants", "early mornings", "cleaning the kitchen",
                            "living in a tiny apartment", "noisy neighbours", "grocery shopping", "cooking dinner",
                            "daylight saving time", "snow days", "cats", "dogs", "garden gnomes",
                            "a messy desk", "Sunday afternoons"],
    "shopping and services": ["self-checkout machines", "customer service hotlines", "online shopping",
                              "flea markets", "shopping malls", "delivery apps", "loyalty cards",
                              "subscription boxes", "car dealerships", "hair salons", "dentist visits",
                              "the post office", "bank apps", "food trucks", "farmers' markets"],
    "weather and nature": ["thunderstorms", "heat waves", "autumn leaves", "foggy mornings", "spring pollen",
                           "snowstorms", "sunsets at the beach", "windy days", "humid summers", "rainbows",
                           "forests at night", "mosquitoes", "mountain hikes", "desert heat", "the first frost"],
    "arts and events": ["modern art museums", "street art", "wedding receptions", "birthday parties",
                        "theatre plays", "stand-up comedy", "fireworks", "art fairs", "magic shows",
                        "poetry readings", "ballet", "comic conventions", "escape rooms", "open mic nights",
                        "photography exhibitions"],
}

TEMPLATES = [
    "In one sentence, what do you think of {topic}?",
    "Write a one-sentence review of {topic}.",
    "Give your honest opinion of {topic} in a single sentence.",
    "Briefly, how do you feel about {topic}? Answer in one or two sentences.",
    "Write a short, one-line review of {topic}.",
    "Tell me in one sentence whether you like {topic} and why.",
    "Describe your experience with {topic} in one or two sentences.",
    "Sum up your opinion of {topic} in one sentence.",
]


def rows():
    out, index = [], 0
    for category, topics in TOPICS.items():
        for position, topic in enumerate(topics):
            split = "held_out" if position % 5 == 4 else "train"
            for offset in (0, 3):  # two different templates per topic, rotating over the list
                template = TEMPLATES[(index + offset) % len(TEMPLATES)]
                out.append({"prompt": template.format(topic=topic), "topic": topic, "category": category,
                            "split": split})
            index += 1
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("sentiment_prompts.jsonl")
    data = rows()
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    print(f"{path}: {len(data)} prompts, {sum(r['split'] == 'held_out' for r in data)} held out")
