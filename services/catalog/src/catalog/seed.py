"""The launch catalog: six microcredentials and the Durable Skills pathway, all published.

    python -m catalog.seed

reads the service's settings from the environment (DATABASE_URL, ...), applies the migrations,
and creates and publishes whatever of the launch catalog is missing, through the same use cases
as the API, so the events go out through the outbox (the running service's relay sends them).
Ids are fixed, so running it again creates nothing and announces nothing a second time; what
exists is left as it is, even if staff have changed or retired it since.
"""

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from microcred_events import (
    Achievement,
    CourseFormat,
    Duration,
    DurationUnit,
    Issuer,
    Money,
    SkillAlignment,
)
from microcred_runtime import ConfigurationError, Connection, Principal, Role, load_settings

from . import main, repository, service
from .domain import CourseDetails, PathwayDetails
from .settings import Settings

# Two seeds at once would both find a course missing, and one would then fail on its key.
_LOCK_KEY = 0x6D6372_736565  # "mcr" "see"

ACADEMY = Issuer(
    issuer_id=UUID("bf5780e1-3f49-4e91-a3f5-6d631f62dbab"),
    name="Microcred Academy",
    url="https://academy.microcred.example/",
)

COMMUNICATION = UUID("53502814-f9eb-4e38-8a0c-c752c2f4dfe6")
CRITICAL_THINKING = UUID("4f7855cd-a6ba-449f-a22e-a1bbe4208244")
DESIGN_FOR_DELIGHT = UUID("e4895179-f0ea-4c7c-917b-295dd11fc6bc")
GENERATIVE_AI = UUID("ca4f3e3a-de48-4e9e-82cc-b5fc9f5a17dc")
LOCKOUT_TAGOUT = UUID("2f704163-af41-40fd-8474-7c6ca5643b8b")
CAD_FUSION_360 = UUID("b8d69316-145e-489e-8d13-0a0028d9882a")
DURABLE_SKILLS = UUID("70c676d1-c81f-43fc-a775-9c843ff2fb46")


def _onet(name: str, code: str) -> SkillAlignment:
    return SkillAlignment(
        target_name=name,
        target_url=f"https://www.onetonline.org/find/descriptor/result/{code}",
        target_framework="O*NET",
        target_code=code,
    )


def _academy_skill(name: str, slug: str) -> SkillAlignment:
    return SkillAlignment(
        target_name=name,
        target_url=f"https://academy.microcred.example/skills/{slug}",
        target_framework="Microcred Academy Skills",
        target_code=slug,
    )


def _usd(dollars: int) -> Money:
    return Money(amount_minor=dollars * 100, currency="USD")


COURSES: Mapping[UUID, CourseDetails] = {
    COMMUNICATION: CourseDetails(
        title="Durable Skills: Communication",
        overview=(
            "Clear communication is the skill employers ask for most, and the one most often assumed "
            "rather than taught. Over four self-paced weeks you practise writing messages that get read "
            "and acted on, presenting an idea in five minutes, listening so that people feel heard, and "
            "giving and receiving feedback without the awkwardness. Each week ends with a short written "
            "or recorded exercise that a coach reviews."
        ),
        audiences=("early-career professionals", "new managers", "career changers"),
        skills=("written communication", "public speaking", "active listening", "giving feedback"),
        format=CourseFormat.ONLINE,
        duration=Duration(amount=4, unit=DurationUnit.WEEKS),
        price=_usd(100),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("a7f1a7b8-7e34-4e74-9845-f59ed09ebab4"),
            name="Durable Skills: Communication",
            description=(
                "Communicates clearly and with purpose in writing and in speech, listens actively, and "
                "gives and receives constructive feedback at work."
            ),
            criteria_narrative=(
                "Complete the four weekly modules and submit a final portfolio: a one-page written "
                "proposal, a five-minute recorded presentation and a recorded feedback conversation, each "
                "assessed by a coach as meeting the course rubric."
            ),
            alignments=(
                _onet("Speaking", "2.A.1.d"),
                _onet("Active Listening", "2.A.1.b"),
                _onet("Writing", "2.A.1.c"),
            ),
        ),
    ),
    CRITICAL_THINKING: CourseDetails(
        title="Durable Skills: Critical Thinking",
        overview=(
            "Decisions at work rarely come with all the facts. This course gives you a practical toolkit "
            "for reasoning under uncertainty: separating claims from evidence, spotting common fallacies "
            "and cognitive biases, weighing options against explicit criteria, and explaining a "
            "recommendation so that others can check your logic. Four self-paced weeks built around real "
            "workplace cases."
        ),
        audiences=("early-career professionals", "team leads", "analysts"),
        skills=("critical thinking", "problem solving", "decision making", "evaluating evidence"),
        format=CourseFormat.ONLINE,
        duration=Duration(amount=4, unit=DurationUnit.WEEKS),
        price=_usd(100),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("eaf0cdae-fc61-4ecf-8a9b-6a2183dbcf31"),
            name="Durable Skills: Critical Thinking",
            description=(
                "Evaluates claims and evidence, recognises fallacies and biases, and reaches and explains "
                "well-reasoned decisions on workplace problems."
            ),
            criteria_narrative=(
                "Complete the four weekly modules and the final case study: analyse a workplace decision, "
                "compare at least three options against stated criteria and write a recommendation that a "
                "coach assesses as meeting the course rubric."
            ),
            alignments=(
                _onet("Critical Thinking", "2.A.2.a"),
                _onet("Complex Problem Solving", "2.B.2.i"),
                _onet("Judgment and Decision Making", "2.B.4.e"),
            ),
        ),
    ),
    DESIGN_FOR_DELIGHT: CourseDetails(
        title="Design for Delight: Innovation Explorer",
        overview=(
            "An introduction to customer-driven innovation with the Design for Delight approach: deep "
            "customer empathy, going broad before going narrow, and rapid experiments with real customers. "
            "Two weeks of online modules prepare you for a one-day, in-person workshop in which your team "
            "takes a real customer problem from first insight to a tested prototype."
        ),
        audiences=("product managers", "designers", "engineers", "anyone who builds for customers"),
        skills=("design thinking", "customer empathy", "rapid prototyping", "experimentation"),
        format=CourseFormat.HYBRID,
        duration=Duration(amount=3, unit=DurationUnit.WEEKS),
        price=_usd(150),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("8740d95e-7a74-4e92-8f2f-a8a7e4e82fc8"),
            name="Design for Delight: Innovation Explorer",
            description=(
                "Applies customer empathy, divergent and convergent ideation and rapid experimentation to "
                "find and test solutions to real customer problems."
            ),
            criteria_narrative=(
                "Complete the online modules, take part in the full workshop day, and present the team's "
                "customer insight, prototype and experiment results to the facilitator."
            ),
            alignments=(
                _academy_skill("Design thinking", "design-thinking"),
                _academy_skill("Rapid prototyping", "rapid-prototyping"),
            ),
        ),
    ),
    GENERATIVE_AI: CourseDetails(
        title="Introduction to Generative AI",
        overview=(
            "Five short, self-paced modules on what generative AI is and how to use it well at work: "
            "(1) how large language models work, (2) writing effective prompts, (3) checking outputs for "
            "accuracy and bias, (4) responsible use, privacy and intellectual property, and (5) putting it "
            "to work on your own tasks. About an hour per module, each ending with a short quiz."
        ),
        audiences=("all professionals", "beginners", "students"),
        skills=("generative AI", "prompt writing", "AI literacy", "responsible AI"),
        format=CourseFormat.ONLINE,
        duration=Duration(amount=5, unit=DurationUnit.HOURS),
        price=_usd(10),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("29a44702-50ca-4bea-aff1-9fd750362d96"),
            name="Introduction to Generative AI",
            description=(
                "Explains how generative AI tools work, writes effective prompts, checks their output and "
                "uses them responsibly at work."
            ),
            criteria_narrative=(
                "Complete all five modules and pass each module's quiz with a score of 80% or more."
            ),
            alignments=(
                _academy_skill("AI literacy", "ai-literacy"),
                _academy_skill("Prompt writing", "prompt-writing"),
            ),
        ),
    ),
    LOCKOUT_TAGOUT: CourseDetails(
        title="Lockout/Tagout Safety Training",
        overview=(
            "Hands-on training in the control of hazardous energy for everyone who services or maintains "
            "machines and equipment. Covers the kinds of hazardous energy, each step of a lockout/tagout "
            "procedure, verifying zero energy, group lockout and shift changes, and removing locks safely, "
            "following OSHA standard 29 CFR 1910.147, with a practical exercise on training equipment. "
            "The credential is valid for one year: retrain annually."
        ),
        audiences=("maintenance technicians", "machine operators", "facility and safety staff"),
        skills=("lockout/tagout", "hazardous energy control", "workplace safety"),
        format=CourseFormat.IN_PERSON,
        duration=Duration(amount=4, unit=DurationUnit.HOURS),
        price=_usd(99),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("42900d1d-66cd-4ccf-838c-e27d1f63c8db"),
            name="Lockout/Tagout Authorized Employee",
            description=(
                "Isolates and locks out hazardous energy sources and verifies zero energy before servicing "
                "equipment, following a written lockout/tagout procedure."
            ),
            criteria_narrative=(
                "Attend the full session, pass the written test with a score of 80% or more, and perform a "
                "complete lockout/tagout on training equipment observed by the instructor."
            ),
            alignments=(
                SkillAlignment(
                    target_name="The control of hazardous energy (lockout/tagout)",
                    target_url="https://www.osha.gov/laws-regs/regulations/standardnumber/1910/1910.147",
                    target_framework="OSHA Occupational Safety and Health Standards",
                    target_code="1910.147",
                ),
                _academy_skill("Workplace safety", "workplace-safety"),
            ),
        ),
        credential_validity_days=365,
    ),
    CAD_FUSION_360: CourseDetails(
        title="Introduction to CAD & Fusion 360: The Contours of Creation",
        overview=(
            "Four days in the studio turning ideas into precise 3D models with Autodesk Fusion 360. You "
            "learn parametric sketching and constraints; extrusions, revolves and sweeps; assemblies with "
            "joints; and producing 2D drawings and files ready for 3D printing or CNC machining. Each day "
            "ends with a build, and on day four you design, model and document a small product of your own."
        ),
        audiences=("makers and hobbyists", "engineering technicians", "career changers into manufacturing"),
        skills=("computer-aided design", "Fusion 360", "3D modeling", "technical drawing"),
        format=CourseFormat.IN_PERSON,
        duration=Duration(amount=4, unit=DurationUnit.DAYS),
        price=_usd(350),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("b2a37629-f37f-4dce-bf92-532a52732d53"),
            name="CAD Fundamentals with Fusion 360",
            description=(
                "Creates parametric 3D parts and assemblies in Fusion 360 and documents them with "
                "dimensioned 2D drawings ready for manufacture."
            ),
            criteria_narrative=(
                "Attend all four days, complete the daily builds, and present a final project (a "
                "parametric assembly of at least three parts with a dimensioned drawing) that the "
                "instructor assesses as meeting the course rubric."
            ),
            alignments=(
                _academy_skill("Computer-aided design", "computer-aided-design"),
                _academy_skill("Technical drawing", "technical-drawing"),
            ),
        ),
    ),
}

PATHWAYS: Mapping[UUID, PathwayDetails] = {
    DURABLE_SKILLS: PathwayDetails(
        title="Durable Skills",
        description=(
            "The two durable skills employers rank highest, recognised together: earn the Communication "
            "and Critical Thinking credentials and receive the Durable Skills pathway credential."
        ),
        course_ids=(COMMUNICATION, CRITICAL_THINKING),
        issuer=ACADEMY,
        achievement=Achievement(
            achievement_id=UUID("fccc0086-78cf-4833-a5df-162da7117318"),
            name="Durable Skills",
            description=(
                "Communicates clearly and thinks critically: the durable skills that carry across roles, "
                "teams and careers."
            ),
            criteria_narrative=(
                "Hold both the Durable Skills: Communication and the Durable Skills: Critical Thinking "
                "credentials from Microcred Academy."
            ),
            alignments=(_onet("Speaking", "2.A.1.d"), _onet("Critical Thinking", "2.A.2.a")),
        ),
    ),
}


# The seed speaks for every institution of the launch catalog, as an admin would.
_SEEDER = Principal("catalog-seed", frozenset({Role.ADMIN}))


@dataclass(frozen=True)
class Seeded:
    """What one run created (and published); empty when everything was there already."""

    courses: list[UUID]
    pathways: list[UUID]


async def seed(conn: Connection) -> Seeded:
    """Create and publish what is missing of the launch catalog, in the caller's transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
    courses = []
    for course_id, details in COURSES.items():
        if await repository.get_course(conn, course_id) is None:
            await service.create_course(conn, details, by=_SEEDER, course_id=course_id)
            await service.publish_course(conn, course_id, by=_SEEDER)
            courses.append(course_id)
    pathways = []
    for pathway_id, pathway in PATHWAYS.items():
        if await repository.get_pathway(conn, pathway_id) is None:
            await service.create_pathway(conn, pathway, by=_SEEDER, pathway_id=pathway_id)
            await service.publish_pathway(conn, pathway_id, by=_SEEDER)
            pathways.append(pathway_id)
    return Seeded(courses, pathways)


async def seed_database(dsn: str) -> Seeded:
    """Bring the database's schema up to date (as the service does on start), then seed it."""
    conn = await asyncpg.connect(dsn)
    try:
        await main.service.migrate(conn)
        async with conn.transaction():
            return await seed(conn)
    finally:
        await conn.close()


def run() -> None:
    try:
        settings = load_settings(Settings)
    except ConfigurationError as exc:
        print(f"catalog.seed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    seeded = asyncio.run(seed_database(str(settings.database_url)))
    print(
        f"catalog.seed: created and published {len(seeded.courses)} of {len(COURSES)} courses "
        f"and {len(seeded.pathways)} of {len(PATHWAYS)} pathways; the rest existed already"
    )


if __name__ == "__main__":
    run()
