"""Contexts for the context-folding benchmark: what users prepend today, written for this project.

PERSONA is an expert persona of the length PRISM's personas have (≈ 200 tokens), the context a
PRISM adapter replaces. Longer contexts follow the persona with retrieved passages, in the
style of a retrieval-augmented system prompt ("[Document k] title: text"); the passages repeat
with new numbers once all are used, since what a prefill costs depends on the number of tokens,
not on their meaning. `context_text(tokenizer, n)` cuts the text to n tokens of that tokenizer.
"""

from __future__ import annotations

PERSONA = (
    "You are Dr. Maren Holt, a clinical pharmacist with twenty years of experience in hospital "
    "medicine and anticoagulation clinics. You explain drug interactions, dosing and side "
    "effects in plain language, and you always say when a question needs a doctor who can "
    "examine the patient. You are careful with numbers: you give doses only as ranges from "
    "published guidelines, name the guideline, and remind the reader that kidney and liver "
    "function change them. When a medicine has a narrow therapeutic window, such as warfarin, "
    "lithium or digoxin, you say so first. You never guess: if the evidence is weak or mixed, "
    "you say that, and you describe what the studies did find. You prefer short answers with a "
    "clear first sentence, followed by the reasons, and a last line on what to watch for. You "
    "are warm but direct, you avoid jargon unless you define it, and you do not recommend brands. "
    "If a question is about an emergency, you say to call emergency services before anything else."
)

PASSAGES = [
    ("Warfarin and vitamin K",
     "Warfarin lowers the activity of the clotting factors that depend on vitamin K. Because "
     "of this, the amount of vitamin K in the diet changes how strongly a given dose works. "
     "Patients are not asked to avoid green vegetables; they are asked to eat about the same "
     "amount each week, so that the dose found by INR testing stays right. A sudden change, "
     "such as starting a juice cleanse or a course of nutritional drinks, can move the INR by "
     "a full point within a week. Clinics usually recheck the INR within five to seven days of "
     "any large change in diet, after a course of antibiotics, or when a new medicine is "
     "started, because many antibiotics and antifungals slow the breakdown of warfarin."),
    ("Kidney function and dose adjustment",
     "Many drugs leave the body through the kidneys, and their doses are adjusted when kidney "
     "function falls. The estimate most labels use is creatinine clearance from the "
     "Cockcroft-Gault equation, which needs age, weight, sex and serum creatinine. Laboratories "
     "often report the eGFR instead, which is normalised to body surface area; for very small "
     "or very large patients the two can differ by more than a third. Drugs with a narrow "
     "margin, such as enoxaparin, dabigatran, gabapentin and several antibiotics, have tables "
     "of reduced doses by clearance band. When function changes quickly, as in acute kidney "
     "injury, no single estimate is reliable, and levels or clinical signs guide the dose."),
    ("Grapefruit and CYP3A4",
     "Grapefruit juice contains furanocoumarins that switch off the CYP3A4 enzyme in the wall "
     "of the gut. Drugs that are normally broken down there on their first pass, such as "
     "simvastatin, some calcium channel blockers and a few immunosuppressants, then reach the "
     "blood in much higher amounts. The effect lasts about a day after a single glass, so "
     "separating the juice and the tablet by a few hours does not help. Other citrus fruits, "
     "such as Seville oranges and pomelos, have the same compounds, while sweet oranges do "
     "not. Drug labels list the interaction where it matters; for statins, switching to one "
     "that is not broken down by CYP3A4 is a common solution."),
    ("Lithium levels",
     "Lithium is cleared almost entirely by the kidneys, in step with sodium. Anything that "
     "makes the body hold on to sodium, such as dehydration, a low-salt diet, diuretics, ACE "
     "inhibitors or regular use of anti-inflammatory painkillers, raises the lithium level. "
     "Levels are measured twelve hours after the last dose, and the usual maintenance range is "
     "narrow. Early signs of too much lithium include a coarse tremor, diarrhoea, vomiting and "
     "unsteadiness; confusion is a late sign and needs urgent care. Patients are advised to "
     "drink normally during hot weather and illness, and to ask before starting any new "
     "medicine, including those sold without a prescription."),
    ("Digoxin and potassium",
     "Digoxin slows the heart rate in atrial fibrillation and strengthens contraction in some "
     "forms of heart failure. It binds to the same pump as potassium, so a low potassium level "
     "makes its effects, and its toxicity, stronger. Diuretics that lower potassium are a "
     "frequent cause. Toxicity can show as nausea, loss of appetite, changes in colour vision "
     "or new rhythm problems, often at levels that are within the laboratory's range. Older "
     "patients and those with reduced kidney function need lower doses. Several common drugs, "
     "including amiodarone, verapamil and clarithromycin, raise digoxin levels, and the dose "
     "is often halved when one of them is started."),
    ("Direct oral anticoagulants",
     "Apixaban, rivaroxaban, edoxaban and dabigatran act directly on a single clotting factor "
     "and do not need routine INR monitoring. Their effect starts within hours and fades within "
     "a day or two, which makes missed doses more important than with warfarin. Each has its "
     "own dose-reduction rules based on age, weight, kidney function or interacting drugs. "
     "Strong inhibitors or inducers of both CYP3A4 and P-glycoprotein, such as some antifungals "
     "and rifampicin, change their levels and are usually avoided. Specific reversal agents "
     "exist for dabigatran and for the factor Xa inhibitors, and hospitals keep protocols for "
     "bleeding and for urgent surgery."),
    ("Paracetamol and the liver",
     "Paracetamol, also called acetaminophen, is safe at recommended doses for most people, but "
     "its toxic breakdown product can damage the liver when the usual route is overwhelmed. "
     "Risk rises with doses above the daily maximum, with fasting or malnutrition, and with "
     "regular heavy alcohol use. Many cold and flu products contain paracetamol, so people can "
     "exceed the limit without knowing it. After an overdose, symptoms may be absent for a day "
     "while damage is already under way, which is why a blood level is taken and compared "
     "against a treatment nomogram. The antidote, acetylcysteine, works best when it is started "
     "within eight hours."),
    ("St John's wort",
     "St John's wort is a herbal remedy used for low mood. It induces several liver enzymes and "
     "the P-glycoprotein transporter, and so lowers the levels of many medicines: oral "
     "contraceptives, ciclosporin, some HIV medicines, warfarin and digoxin among them. The "
     "effect builds up over about two weeks and wears off over a similar time after stopping, "
     "so levels of the other drug can rise when the herb is stopped. Combined with serotonergic "
     "antidepressants it may also contribute to serotonin syndrome. Because it is sold without "
     "a prescription, patients often do not mention it, and a direct question about herbal "
     "products is part of a careful medication history."),
]


def context_text(tokenizer, n_tokens: int) -> str:
    """The persona followed by numbered passages, cut to exactly n_tokens tokens when encoded
    alone (chat-template tokens come on top). n_tokens ≤ the persona's length gives a prefix of
    it."""
    parts = [PERSONA]
    total = len(tokenizer(PERSONA, add_special_tokens=False)["input_ids"])
    k = 0
    while total < n_tokens:
        title, text = PASSAGES[k % len(PASSAGES)]
        k += 1
        part = f"\n\n[Document {k}] {title}: {text}"
        parts.append(part)
        total += len(tokenizer(part, add_special_tokens=False)["input_ids"])
    ids = tokenizer("".join(parts), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


QUESTIONS = [
    "Can I take ibuprofen with warfarin?",
    "My mother's kidney function dropped last month. Should any of her tablets be changed?",
    "Is one glass of grapefruit juice in the morning a problem with simvastatin?",
    "What are the early signs that a lithium level is too high?",
    "Why does my doctor check potassium when I take digoxin?",
    "I missed my evening dose of apixaban. What should I do now?",
    "How much paracetamol is too much in one day for an adult who drinks a little wine "
    "most evenings?",
    "Does St John's wort interact with the contraceptive pill, and for how long after "
    "stopping it?",
]
